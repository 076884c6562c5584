"""The backend's half of `block_network=True` (see `netjail`): a Unix socket per worker that
carries its connections on to the control plane, and the command that starts the worker in a
network namespace of its own."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from mctl.core.launch import LaunchSpec

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def problem(launch: LaunchSpec) -> str:
    """Why this machine cannot run the launch without network ('' when it can)."""
    if launch.runtime == "oci":
        return ("functions in a container image cannot have block_network=True yet; use an "
                "image without system packages (it runs as a process) or remove it")
    if not shutil.which("unshare"):
        return "util-linux's `unshare` is not installed on this machine"
    url = urlsplit(launch.env.get("MCTL_SERVER_URL", ""))
    if url.hostname not in LOOPBACK:
        return (f"the control plane's address ({url.hostname}) is not this machine's loopback; "
                "a worker without network reaches only 127.0.0.1")
    return ""


class Bridge:
    """A Unix socket server: each connection goes on to the control plane's TCP port."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.dir = tempfile.mkdtemp(prefix="mctl-net-")
        self.path = os.path.join(self.dir, "cp.sock")
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._carry, path=self.path)

    async def _carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                with contextlib.suppress(OSError, RuntimeError):
                    dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        shutil.rmtree(self.dir, ignore_errors=True)


async def wrap(argv: list[str], launch: LaunchSpec, task_id: str) -> tuple[list[str], Any]:
    """The worker's command in a namespace without network, and the bridge that serves it."""
    url = urlsplit(launch.env["MCTL_SERVER_URL"])
    port = url.port or (443 if url.scheme == "https" else 80)
    bridge = Bridge("127.0.0.1" if url.hostname == "localhost" else url.hostname or "127.0.0.1",
                    port)
    await bridge.start()
    unshare = ["unshare", "--net"] if os.geteuid() == 0 else ["unshare", "--user",
                                                              "--map-root-user", "--net"]
    return [*unshare, "--", sys.executable, "-m", "mctl.core.runtime.netjail", bridge.path,
            str(port), "--", *argv], bridge
