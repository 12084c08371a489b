"""Running the reward server's app with uvicorn: on a socket bound up front (so port 0 works and
the real port is known), in the foreground (`urm-jax serve`) or on a background thread
(`ServerThread`: tests, benchmarks, notebooks).

Shutdown (SIGINT/SIGTERM, `ServerThread.stop`): stop accepting, close idle connections, run the
app's drain (``app.state.drain``: queued requests finish or get 503), then uvicorn's own
shutdown, with no task cancelled (a cancelled request would get uvicorn's plain-text 500 and log
a traceback); a second signal forces the exit.

Slow headers: uvicorn has no timeout for a request's headers (only ``timeout_keep_alive`` between
requests and a 16 KiB cap on incomplete headers, ``h11_max_incomplete_event_size``), so a client
sending headers a byte at a time holds a connection open; the server binds to loopback by default,
and one exposed to untrusted clients belongs behind a proxy that has one (nginx
``client_header_timeout``).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import threading
import time

import uvicorn


class ListenError(OSError):
    """The server cannot listen where it was told (message names host and port)."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port); port 0 picks a free one (see `socket_url`).
    ListenError (an OSError) naming host and port when the host does not resolve, the address
    is taken or is not an address of this machine."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as err:
        raise ListenError(f"cannot listen on {host}:{port}: the host {host!r} does not resolve "
                          f"({err.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        reason = {errno.EADDRINUSE: "address already in use",
                  errno.EADDRNOTAVAIL: f"{host} is not an address of this machine",
                  errno.EACCES: "permission denied (ports below 1024 need privileges)"}.get(
                      err.errno, (err.strerror or str(err)).lower())
        raise ListenError(f"cannot listen on {host}:{port}: {reason}") from None
    return sock


def socket_url(sock: socket.socket) -> str:
    """``http://host:port`` of a bound socket (IPv6 hosts in brackets)."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine (localhost, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class DrainingServer(uvicorn.Server):
    """uvicorn's server, whose shutdown drains the app (``app.state.drain``, when it has one)
    after it stops accepting and before uvicorn waits for the remaining requests."""

    async def shutdown(self, sockets=None) -> None:
        """Stop listening, close the given sockets, then let uvicorn finish open connections
        (no shutdown timeout: the app's drain decides when queued work ends)."""
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()  # idle keep-alive connections close; busy ones after their answer
        state = getattr(self.config.app, "state", None)
        drain = getattr(state, "drain", None) if state is not None else None
        if drain is not None:
            task = asyncio.ensure_future(drain())
            while not task.done() and not self.force_exit:  # a second signal: stop now
                await asyncio.wait({task}, timeout=0.1)
            if not task.done():
                task.cancel()
        await super().shutdown(sockets)


def uvicorn_server(app, *, log_level: str = "warning", access_log: bool = False,
                   graceful_timeout_s: float | None = None) -> uvicorn.Server:
    """A uvicorn server for `app` (lifespan on: it starts and stops the device worker). By
    default no request is cancelled at shutdown (``graceful_timeout_s`` None): the app's drain
    bounds how long they take."""
    config = uvicorn.Config(app, lifespan="on", log_level=log_level, access_log=access_log,
                            timeout_graceful_shutdown=graceful_timeout_s)
    return DrainingServer(config)


class ServerThread:
    """Serve `app` on a background thread at ``http://host:port`` (port 0: a free port).

        with ServerThread(create_app(batcher)) as server:
            httpx.get(server.url + "/health")

    `start` returns once uvicorn accepts connections (the model may still be loading: poll
    /health); `stop` shuts down gracefully (in-flight requests finish) and joins the thread.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, **server_kwargs):
        self._sock = bind_socket(host, port)
        self.url = socket_url(self._sock)
        self.server = uvicorn_server(app, **server_kwargs)
        self._thread = threading.Thread(target=self._run, name="urm-http", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self._sock])
        except BaseException as err:  # noqa: BLE001 - surfaced by start()/stop()
            self.error = err

    def start(self, timeout: float = 120.0) -> "ServerThread":
        """Start uvicorn on its thread and wait until it accepts connections (polling every 10 ms, at most
        `timeout` seconds); RuntimeError, with the server's error if any, when it dies or times out."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start serving {self.url} within {timeout:g} s"
                                   + (f": {self.error!r}" if self.error else ""))
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 120.0) -> None:
        """Ask uvicorn to exit (in-flight requests finish), join its thread for up to `timeout` seconds and
        close the socket; RuntimeError when the thread is still alive after that."""
        self.server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()
        if self._thread.is_alive():
            raise RuntimeError(f"the server at {self.url} did not shut down within {timeout:g} s")

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
