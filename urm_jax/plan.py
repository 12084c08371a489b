"""Know before you pay: compile a training recipe's real programs for a TPU (or GPU) topology on
this CPU machine and read the compiler's own memory per chip.

    urm-jax plan configs/hardware/v5p-8.yaml [key=value ...] [--topology v5p:2x2x1]

libtpu (the `jax[tpu]` extra) carries a compile-only TPU client: `get_topology_desc` describes a
slice's chips without owning any, a mesh over them plus ShapeDtypeStruct inputs with their
shardings lower and compile the step exactly as `urm-jax train` would build it on the pod
(`urm_jax.train.step.step_layout`), and `memory_analysis()` of the compiled program is the
compiler's per-chip buffer assignment: arguments (parameters, optimiser state, batch), outputs,
aliases (outputs written into donated arguments, counted once), temporaries (gradients,
activations, collectives' buffers). Peak per chip = arguments + outputs - aliases + temporaries
(+ the program itself). A program whose temporaries alone exceed the chip is refused by the TPU
compiler (RESOURCE_EXHAUSTED): the plan reports it as not fitting, in the compiler's words. GPUs
go the same way through the CUDA plugin's deviceless compile (`_gpu_devices`).

Programs compiled per stage:
  stage 1            the train step (forward, backward, AdamW update, all micro-batches);
  stage 2, cached    the feature pass (the frozen backbone's forward over one micro-batch of pairs
                     at full seq_len: the largest bucket) and the gate-only step on features;
  stage 2, tokens    the train step through the frozen backbone.
Nothing runs: no arrays are allocated, and the host needs only CPU and RAM (the 8B stage-1 step
takes 6-12 minutes of wall time on a loaded 2-core host, bench/tpu_plan_results.md). XLA's `cost_analysis()` of
these programs counts the layer scan's body once, so it is not a step time and is not reported.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

import jax
from jax.experimental import topologies
from jax.sharding import NamedSharding

from urm_jax.config import ModelConfig
from urm_jax.memory import CHIPS, GB, MARGIN, PLATFORMS, estimate
from urm_jax.model.attention import compile_target
from urm_jax.model.urm import ModelBinder, param_shardings
from urm_jax.sharding import batch_sharding, make_mesh, use_mesh
from urm_jax.train.config import TrainConfig, check_attention_length, parse_topology
from urm_jax.train.features import pooled_forward
from urm_jax.train.step import abstract_step_args, batch_shapes, step_layout, training_param_shapes

TPU_INSTALL_HINT = (f"pip install 'jax[tpu]=={jax.__version__}' (libtpu, ~700 MB; in a separate "
                    "virtual environment if other work on this machine must not see a TPU plugin)")
# The CUDA plugin with its CUDA and cuDNN libraries: enough to compile, no GPU needed (cuDNN's
# flash attention, `attention: auto` on GPU, is built at compile time and needs the library).
GPU_INSTALL_HINT = (f"pip install 'jax[cuda12]=={jax.__version__}' (the CUDA plugin, CUDA and cuDNN "
                    "libraries, ~3.6 GB; no GPU needed to compile; in a separate virtual environment)")
GPU_SPECS = Path(__file__).resolve().parent / "gpu_specs"


def libtpu_requirement() -> str:
    """The libtpu release this jax pins in its `tpu` extra, e.g. 'libtpu==0.0.42.*'."""
    for requirement in metadata.requires("jax") or []:
        name, _, marker = requirement.partition(";")
        if name.strip().startswith("libtpu") and 'extra == "tpu"' in marker:
            return name.strip()
    raise RuntimeError("jax declares no libtpu in its `tpu` extra")


class PlanUnavailable(RuntimeError):
    """This machine cannot compile for a TPU (no libtpu): an environment problem, not bad input."""


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
    """The TPU compiler's buffer assignment of one program, bytes per chip."""

    arguments: int
    outputs: int
    aliases: int  # outputs that reuse a donated argument's buffer (counted once in `total`)
    temporaries: int
    generated_code: int

    @property
    def total(self) -> int:
        """Peak bytes per chip: arguments + outputs - aliases + temporaries (+ the program)."""
        return self.arguments + self.outputs - self.aliases + self.temporaries + self.generated_code

    @classmethod
    def of(cls, compiled) -> "CompiledMemory":
        """Read a compiled program's memory analysis (bytes per chip)."""
        m = compiled.memory_analysis()
        return cls(int(m.argument_size_in_bytes), int(m.output_size_in_bytes), int(m.alias_size_in_bytes),
                   int(m.temp_size_in_bytes), int(m.generated_code_size_in_bytes))


@dataclasses.dataclass(frozen=True)
class ProgramPlan:
    """One compiled program of a plan ('train step' or 'feature pass'): its memory per chip (None when
    the compiler refused it, with its words in `refused`) and the compile time in seconds."""
    name: str  # "train step" | "feature pass"
    memory: CompiledMemory | None  # None: the compiler refused the program (`refused`)
    compile_seconds: float
    refused: str | None = None  # the compiler's own words when the program cannot fit the chip


@dataclasses.dataclass(frozen=True)
class Plan:
    """A recipe compiled for a topology: every program's memory per chip, the estimate, the HBM."""

    topology: str
    chip: str
    num_chips: int
    mesh: tuple[int, int, int]
    programs: tuple[ProgramPlan, ...]
    estimate: dict  # urm_jax.memory.estimate for the same config and mesh, on the target platform

    @property
    def hbm(self) -> float:
        """HBM bytes of one chip of the topology (decimal, as `urm_jax.memory.CHIPS` lists)."""
        return CHIPS[self.chip]

    @property
    def peak(self) -> ProgramPlan | None:
        """The compiled program that needs the most memory (None if none compiled)."""
        compiled = [p for p in self.programs if p.memory is not None]
        return max(compiled, key=lambda p: p.memory.total) if compiled else None

    @property
    def free(self) -> float | None:
        """Fraction of HBM left at the peak program (negative: it does not fit; None: refused)."""
        if self.refused:
            return None
        return 1 - self.peak.memory.total / self.hbm

    @property
    def refused(self) -> list[ProgramPlan]:
        """The programs the compiler refused for the chip (empty when all compiled)."""
        return [p for p in self.programs if p.refused]

    @property
    def fits(self) -> bool:
        """Whether every program compiled and the peak program's memory fits one chip's HBM."""
        return not self.refused and self.peak.memory.total <= self.hbm

    def to_dict(self) -> dict:
        """Plain data (bytes per chip, seconds) for `urm-jax plan --json` and bench/tpu_plan.py."""
        est = self.estimate
        return {"topology": self.topology, "chip": self.chip, "chips": self.num_chips,
                "mesh": list(self.mesh), "hbm": int(self.hbm), "stage": est["stage"],
                "remat": est["remat"], "attention": est["attention"],
                "rows_per_chip": est["rows_per_device"], "seq_len": est["seq_len"],
                "programs": [{"name": p.name, "compile_seconds": round(p.compile_seconds, 1),
                              **({"refused": p.refused} if p.refused else
                                 {**dataclasses.asdict(p.memory), "total": p.memory.total})}
                             for p in self.programs],
                "peak": self.peak.name if self.peak else None, "fits": self.fits,
                "free": None if self.free is None else round(self.free, 4),
                "estimate": {k: v for k, v in est.items() if isinstance(v, int) and not isinstance(v, bool)}}

    @classmethod
    def from_dict(cls, record: dict) -> "Plan":
        """The Plan `to_dict` wrote (e.g. a line of bench/tpu_plan_results.jsonl)."""
        fields = {f.name for f in dataclasses.fields(CompiledMemory)}
        programs = tuple(ProgramPlan(p["name"], None if "refused" in p else CompiledMemory(**{k: p[k] for k in fields}),
                                     p["compile_seconds"], p.get("refused"))
                         for p in record["programs"])
        est = dict(record["estimate"], stage=record["stage"], remat=record["remat"],
                   attention=record["attention"], rows_per_device=record["rows_per_chip"],
                   seq_len=record["seq_len"])
        return cls(record["topology"], record["chip"], record["chips"], tuple(record["mesh"]), programs, est)


def topology_devices(name: str) -> tuple[str, list]:
    """(chip, devices) of a TPU or GPU topology (`plan.topology` syntax, e.g. 'v5p:2x2x1' or
    'h100:1x8'), described by the platform's compiler without any chip attached. PlanUnavailable
    when this machine has no compiler for it; ValueError for a name it rejects (its reason)."""
    chip, dims = parse_topology(name)
    if PLATFORMS[chip] == "gpu":
        return chip, _gpu_devices(name, chip, dims)
    chips = math.prod(dims)
    # On load, libtpu looks for the TPU attached to this host: its type and its slice's workers.
    # There is none; these values only end that search (without them it logs an error that looks
    # fatal and is not). A real TPU VM's own values are left alone; the compiled programs are
    # the same either way (checked for v5p and v6e topologies).
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{chip}-{chips}")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    if not on_tpu_vm():  # the lock guards attached chips: compile-only clients may share the host
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kwargs = {}
    if chips < 4:  # libtpu's default host is 2x2x1 chips: a smaller slice is its own host
        kwargs["chips_per_host_bounds"] = (*dims, 1)[:3]
    try:
        topology = topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs)
    except Exception as err:  # noqa: BLE001 - jax raises several types for a missing plugin
        text = str(err)
        if "lockfile" in text:
            raise PlanUnavailable(f"another process holds libtpu on this TPU VM ({text.strip()})") from None
        if "INVALID_ARGUMENT" in text:
            raise ValueError(f"topology {name!r}: {text.split('INVALID_ARGUMENT:')[-1].strip()}") from None
        raise PlanUnavailable(f"no TPU compiler on this machine ({type(err).__name__}: "
                              f"{text.splitlines()[0] if text else ''}); install it with "
                              f"{TPU_INSTALL_HINT}") from None
    return chip, list(topology.devices)


def _gpu_devices(name: str, chip: str, dims: tuple[int, ...]) -> list:
    """A CUDA topology of `dims` = (hosts, GPUs per host) compiled for without a GPU: the CUDA
    plugin's deviceless mode, given the chip's GpuTargetConfigProto (urm_jax/gpu_specs/)."""
    if len(dims) != 2:
        raise ValueError(f"topology {name!r}: a GPU topology is HOSTSxGPUS, e.g. {chip}:1x8")
    spec = GPU_SPECS / f"{chip}.txtpb"
    if not spec.is_file():
        raise ValueError(f"topology {name!r}: no compile-only description of a {chip} "
                         f"({spec} is missing)")
    try:
        plugin = importlib.util.find_spec("jax_plugins.xla_cuda12")
    except ModuleNotFoundError:  # no jax_plugins namespace at all
        plugin = None
    if plugin is None:
        raise PlanUnavailable(f"no CUDA compiler on this machine; install it with {GPU_INSTALL_HINT}")
    hosts, per_host = dims
    return list(topologies.get_topology_desc("cuda", "cuda", target_config=spec.read_text(),
                                             topology=f"1x{hosts}x{per_host}").devices)


def on_tpu_vm() -> bool:
    """Whether TPU chips are attached to this host (their device files exist)."""
    return any(Path("/dev").glob("accel*")) or any(Path("/dev/vfio").glob("[0-9]*"))


def use_cpu_host() -> None:
    """Make CPU this process's backend before JAX starts one: with libtpu installed, JAX would
    otherwise look for an attached TPU (and wait for it). The TPU compiler is reached through
    the topology, not the backend."""
    from jax._src import xla_bridge  # no public way to ask whether a backend has started

    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")


def _log(message: str) -> None:
    print(f"urm-jax plan: {message}", file=sys.stderr, flush=True)


def _compile(name: str, lower: Callable, log) -> ProgramPlan:
    log(f"compiling the {name} ...")
    start = time.perf_counter()
    try:
        compiled = lower().compile()
    except RuntimeError as err:  # JaxRuntimeError is one
        text = str(err)
        if "RESOURCE_EXHAUSTED" in text:  # the TPU compiler refuses what cannot fit the chip
            seconds = time.perf_counter() - start
            reason = text.split("RESOURCE_EXHAUSTED:")[-1].strip().splitlines()[0]
            log(f"{name}: the compiler refused it after {seconds:.0f} s: {reason}")
            return ProgramPlan(name, None, seconds, reason)
        if "cuDNN not found" in text:  # the CUDA plugin without its libraries
            raise PlanUnavailable(f"cuDNN attention cannot be compiled here (cuDNN not found); install "
                                  f"{GPU_INSTALL_HINT}, or plan with attention=xla") from None
        raise
    seconds = time.perf_counter() - start
    memory = CompiledMemory.of(compiled)
    log(f"{name}: {memory.total / GB:.2f} GB per chip, compiled in {seconds:.0f} s")
    return ProgramPlan(name, memory, seconds)


def plan(cfg: ModelConfig, train: TrainConfig, topology: str, *, log: Callable[[str], None] | None = _log) -> Plan:
    """Compile `train`'s programs for `cfg` on `topology` (e.g. 'v5p:2x2x1', 'h100:1x8') and return
    their memory per chip next to the estimate. The mesh is the config's, resolved over the
    topology's chips (-1 takes the rest). ValueError for a mesh that does not match the
    topology or a bad topology name, TrainConfigError (a ValueError) for a `data.seq_len` the
    attention cannot run; PlanUnavailable without the target's compiler. `log`
    receives progress lines (default: stderr)."""
    log = log or (lambda message: None)
    # One line naming data.seq_len before libtpu loads and anything compiles.
    check_attention_length(train, PLATFORMS[parse_topology(topology)[0]])
    chip, devices = topology_devices(topology)
    mesh = make_mesh(train.mesh, devices)
    shape = tuple(mesh.shape.values())
    platform = PLATFORMS[chip]
    est = estimate(cfg, train, mesh_shape=shape, num_devices=len(devices), platform=platform)
    programs = []
    with compile_target(platform):
        if train.use_features:
            programs.append(_compile("feature pass", lambda: _feature_pass(cfg, train, mesh), log))
        layout = step_layout(cfg, train, 1, mesh)
        state, frozen = abstract_step_args(cfg, train, layout)
        batch = {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=layout.batch_sh)
                 for k, s in batch_shapes(cfg, train).items()}
        programs.append(_compile("train step", lambda: layout.step_fn.lower(state, frozen, batch), log))
    return Plan(topology, chip, len(devices), shape, tuple(programs), est)


def _feature_pass(cfg: ModelConfig, train: TrainConfig, mesh):
    """The lowered stage-2 feature pass: the frozen model's pooled forward over one micro-batch
    of pairs (2B rows) at the full sequence length, as urm_jax.train.loop runs it."""
    options = train.model_options()
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          training_param_shapes(cfg, options), param_shardings(cfg, mesh, None, options))
    rows, length = 2 * train.micro_batch_size, train.data.seq_len
    sharding: NamedSharding = batch_sharding(mesh)
    i32, f32 = jax.numpy.int32, jax.numpy.float32
    batch = {"input_ids": jax.ShapeDtypeStruct((rows, length), i32, sharding=sharding),
             "segment_ids": jax.ShapeDtypeStruct((rows, length), i32, sharding=sharding),
             "pool_index": jax.ShapeDtypeStruct((rows, 1), i32, sharding=sharding),
             "pool_mask": jax.ShapeDtypeStruct((rows, 1), f32, sharding=sharding)}
    forward = pooled_forward(ModelBinder(cfg, options))
    with use_mesh(mesh):
        return forward.lower(params, batch)


def compiler_versions(chip: str) -> str:
    """'jax 0.10.2, libtpu 0.0.42.1' (or the CUDA plugin's version): what compiled a plan."""
    package = "libtpu" if PLATFORMS[chip] == "tpu" else "jax-cuda12-plugin"
    try:
        version = metadata.version(package)
    except metadata.PackageNotFoundError:
        version = "?"
    return f"jax {jax.__version__}, {package} {version}"


def format_header(result: Plan, command: str, versions: str) -> list[str]:
    """The compiled figures as a YAML comment block for a recipe's header (tests/test_memory.py
    reads it back): per program the compiler's memory per chip, the HBM left, the estimate's error."""
    if result.refused:
        raise ValueError(f"{result.refused[0].name}: the compiler refused it ({result.refused[0].refused})")
    peak = result.peak.memory.total
    lines = [f"# Compiled for {result.topology} ({result.num_chips} {result.chip} chips) by `{command}` ({versions}),",
             "# per chip, decimal GB, as the compiler assigns it:"]
    for p in result.programs:
        m = p.memory
        lines.append(f"#   {p.name:<13} arguments {m.arguments / GB:.2f}  outputs {m.outputs / GB:.2f}  "
                     f"aliases {m.aliases / GB:.2f}  temporaries {m.temporaries / GB:.2f}  "
                     f"total {m.total / GB:.2f} GB")
    lines.append(f"#   of {result.hbm / GB:.2f} GB ({result.chip}): {result.free:.0%} free; the estimate above is "
                 f"{(result.estimate['total'] - peak) / peak:+.1%} off the compiled {result.peak.name}")
    return lines


def format_plan(result: Plan, source: str) -> list[str]:
    """The table `urm-jax plan` prints: per program the compiler's memory per chip, then the
    estimate, the HBM and the headroom, in decimal GB."""
    data, fsdp, tensor = result.mesh
    est = result.estimate
    lines = [f"{source} on {result.topology}: {result.num_chips} {result.chip} chips, "
             f"{result.hbm / GB:.2f} GB HBM each; mesh data={data} fsdp={fsdp} tensor={tensor}, "
             f"stage {est['stage']}, remat {est['remat']}, {est['attention']} attention, "
             f"{est['rows_per_device']} row(s) x {est['seq_len']} tokens per chip per micro-batch",
             f"Per chip, decimal GB, as the {PLATFORMS[result.chip].upper()} compiler assigns it:",
             f"  {'program':<14}{'arguments':>10}{'outputs':>9}{'aliases':>9}{'temporaries':>13}"
             f"{'total':>8}{'compile':>10}"]
    for p in result.programs:
        m = p.memory
        if m is None:
            lines.append(f"  {p.name:<14}refused by the compiler after {p.compile_seconds:.0f} s: {p.refused}")
            continue
        lines.append(f"  {p.name:<14}{m.arguments / GB:>10.2f}{m.outputs / GB:>9.2f}{m.aliases / GB:>9.2f}"
                     f"{m.temporaries / GB:>13.2f}{m.total / GB:>8.2f}{p.compile_seconds:>9.0f}s")
    if result.refused:
        lines.append(f"  {'HBM':<14}{'':>41}{result.hbm / GB:>8.2f}  DOES NOT FIT (estimate "
                     f"{est['total'] / GB:.2f} GB)")
        return lines
    peak = result.peak.memory.total
    lines.append(f"  {'estimate':<14}{'':>41}{est['total'] / GB:>8.2f}  "
                 f"({(est['total'] - peak) / peak:+.0%} vs the compiler; urm-jax memory)")
    verdict = ("fits" if result.free >= MARGIN else "fits, but with less than "
               f"{MARGIN:.0%} free (runtime buffers and fragmentation need some)") if result.fits else "DOES NOT FIT"
    lines.append(f"  {'HBM':<14}{'':>41}{result.hbm / GB:>8.2f}  "
                 f"{(result.hbm - peak) / GB:.2f} GB free ({result.free:.0%}) at the {result.peak.name}: {verdict}")
    return lines
