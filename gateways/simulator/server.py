"""Run the simulator (or any ASGI app) with uvicorn in a background thread on a loopback port."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Self

import uvicorn
from starlette.types import ASGIApp

from gateways.simulator.app import create_app
from gateways.simulator.state import SimulatorState


class SimulatorServer:
    """``with SimulatorServer(state) as srv: srv.url`` — a real HTTP server for tests, benchmarks and demos.

    ``target`` is a :class:`SimulatorState` (served by :func:`create_app`) or any ASGI app. The socket is bound
    before the thread starts (``port=0`` picks a free port), and :meth:`start` returns once uvicorn reports
    ``started``. Also usable as ``async with``; stopping does not wait for in-flight requests (a ``hang`` knob
    would otherwise hold the shutdown). ``on_stop`` is awaited on the server's loop once uvicorn has stopped: an app
    that opened loop-bound resources there (zapsync's API and its connection pool) closes them with it.
    """

    def __init__(
        self,
        target: SimulatorState | ASGIApp,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        startup_timeout_s: float = 10.0,
        on_stop: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.state = target if isinstance(target, SimulatorState) else None
        self.app: ASGIApp = create_app(target) if isinstance(target, SimulatorState) else target
        self.host = host
        self._port = port
        self._log_level = log_level
        self._startup_timeout_s = startup_timeout_s
        self._on_stop = on_stop
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._bound_port: int | None = None

    @property
    def port(self) -> int:
        """The bound port (known once started)."""
        if self._bound_port is None:
            raise RuntimeError("server not started")
        return self._bound_port

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:43117``."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> Self:
        """Bind, start uvicorn in a daemon thread and wait until it accepts connections."""
        if self._server is not None:
            return self
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self._port))
        sock.listen(2048)
        sock.set_inheritable(True)
        self._bound_port = int(sock.getsockname()[1])
        config = uvicorn.Config(self.app, log_level=self._log_level, access_log=False, lifespan="off")
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=self._run, args=(server, sock), daemon=True, name=f"sim-server-{self._bound_port}"
        )
        self._sock, self._server, self._thread = sock, server, thread
        thread.start()
        deadline = time.monotonic() + self._startup_timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("simulator server failed to start")
            time.sleep(0.005)
        return self

    def _run(self, server: uvicorn.Server, sock: socket.socket) -> None:
        """The thread: uvicorn on its own loop (uvicorn's choice of loop), then ``on_stop`` on that same loop."""

        async def serve() -> None:
            try:
                await server.serve(sockets=[sock])
            finally:
                if self._on_stop is not None:
                    await self._on_stop()

        with asyncio.Runner(loop_factory=server.config.get_loop_factory()) as runner:
            runner.run(serve())

    def stop(self) -> None:
        """Ask uvicorn to exit at once and join its thread."""
        server, thread, sock = self._server, self._thread, self._sock
        if server is None or thread is None:
            return
        server.should_exit = True
        server.force_exit = True
        thread.join(timeout=10)
        if sock is not None:
            sock.close()
        self._server = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.stop)
