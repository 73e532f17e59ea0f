"""A loopback TCP forwarder in a thread of its own: a port that refuses connections until :meth:`start`, then
relays them to a target (a service "coming back" at an address its clients already use)."""

from __future__ import annotations

import asyncio
import contextlib
import threading


class TcpForwarder:
    """``TcpForwarder(port, target_host, target_port).start()`` … ``.stop()``."""

    def __init__(self, port: int, target_host: str, target_port: int) -> None:
        self.port, self.target = port, (target_host, target_port)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> TcpForwarder:
        """Listen on ``127.0.0.1:port``; returns once connections are accepted."""
        ready = threading.Event()
        loop = asyncio.new_event_loop()

        async def serve() -> None:
            self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port, reuse_address=True)
            ready.set()

        def run() -> None:
            loop.run_until_complete(serve())
            loop.run_forever()
            loop.close()

        self._loop, self._thread = loop, threading.Thread(target=run, daemon=True, name=f"forward-{self.port}")
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError(f"the forwarder on port {self.port} did not start")
        return self

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            with contextlib.suppress(OSError):
                writer.close()

        await asyncio.gather(pipe(client_reader, target_writer), pipe(target_reader, client_writer))

    def stop(self) -> None:
        """Stop listening and join the thread (relayed connections are dropped)."""
        loop, server, thread = self._loop, self._server, self._thread
        if loop is None or thread is None:
            return
        if server is not None:
            loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._loop = self._server = self._thread = None
