"""Side-by-side runs in one process tree: each tool is a long-lived worker subprocess (in its own
venv) that answers JSON-lines requests, so the driver can interleave the tools request by request
(A B A B ...) on identical inputs and both see the same background load.

A request is one JSON object per line on the worker's stdin: {"op": NAME, ...arguments}; the
answer is one JSON line on its stdout: the handler's result plus `wall_s` and `cpu_s` (the
worker's user + system CPU seconds, all threads) spent in the handler and `peak_rss_mb` (the
worker's peak resident memory during the request: the kernel's high-water mark is reset before
each request). Anything else a worker prints goes to its stderr (the driver's log file).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def reset_peak_rss() -> None:
    """Start a new resident-memory high-water mark (Linux: clear_refs 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux: the peak then covers the worker's whole life
        pass


def peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def serve(handlers: dict[str, Callable[..., dict]]) -> None:
    """Answer requests until stdin closes. Handler output (prints) goes to stderr."""
    out = sys.stdout
    sys.stdout = sys.stderr
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        op = request.pop("op")
        reset_peak_rss()
        wall, cpu = time.perf_counter(), _cpu_seconds()
        try:
            result = handlers[op](**request)
        except Exception as exc:  # the driver reports it and stops
            import traceback

            traceback.print_exc()
            result = {"error": f"{type(exc).__name__}: {exc}"}
        result = dict(result, wall_s=time.perf_counter() - wall, cpu_s=_cpu_seconds() - cpu,
                      peak_rss_mb=peak_rss_mb())
        out.write(json.dumps(result) + "\n")
        out.flush()


class Worker:
    """One tool's worker process: `python -m <module>` with the repository on PYTHONPATH."""

    def __init__(self, name: str, python: str | Path, module: str, log: Path, env: dict | None = None):
        self.name = name
        self.log = open(log, "a")
        environ = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/train_throughput.py
        environ.update(env or {})
        self.proc = subprocess.Popen([str(python), "-m", module], cwd=REPO, env=environ, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)

    def call(self, op: str, **arguments) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **arguments}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} worker exited (code {self.proc.wait()}); see {self.log.name}")
        result = json.loads(line)
        if "error" in result:
            raise RuntimeError(f"{self.name} {op}: {result['error']} (traceback in {self.log.name})")
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_process(cmd: list[str], env: dict | None = None, cwd: Path = REPO, log: Path | None = None) -> dict:
    """Run a whole command; its wall seconds, user + system CPU seconds, peak RSS (MB) and exit
    code, from the kernel's accounting of the finished child (wait4). A small helper process
    starts it (`measure` below): a child started straight from this large process would inherit
    this process's memory high-water mark through exec."""
    environ = dict(os.environ, **(env or {}))
    sink = open(log, "a") if log else subprocess.DEVNULL
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        try:
            subprocess.run([sys.executable, "-m", "bench.peers.worker", "measure", result.name, "--", *cmd],
                           cwd=cwd, env=dict(environ, PYTHONPATH=str(REPO)) if "PYTHONPATH" not in environ
                           else environ, stdout=sink, stderr=sink, check=True)
        finally:
            if log:
                sink.close()
        return json.loads(Path(result.name).read_text())


def _measure(result_path: str, cmd: list[str]) -> None:
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: this small process's image, replaced by the command
        try:
            os.execvp(cmd[0], cmd)
        finally:
            os._exit(127)
    _, status, usage = os.wait4(pid, 0)
    Path(result_path).write_text(json.dumps({
        "wall_s": time.perf_counter() - start, "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": usage.ru_maxrss / 1024, "returncode": os.waitstatus_to_exitcode(status)}))


if __name__ == "__main__" and sys.argv[1:2] == ["measure"]:
    _measure(sys.argv[2], sys.argv[4:])
