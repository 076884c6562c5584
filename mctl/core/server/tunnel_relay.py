"""A sandbox's tunnel through the control plane: a TCP port on the control plane's own address
whose connections are relayed, byte for byte, to a port the sandbox publishes on a cluster node.

Clients get this address, not the node's: a client reaches the control plane (it uses its API),
while compute nodes usually sit on a network only the head or login nodes reach. One relay per
published port, opened when the sandbox runs and closed (with its connections) when it ends.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("mctl.sandboxes.tunnel")

CONNECT_TIMEOUT_S = 10.0


class TcpRelay:
    """Listen on (`host`, a free port); relay each connection to `target`."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, int(target_port))
        self.server: asyncio.AbstractServer | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self, host: str) -> int:
        """Start listening; the port. A `host` this machine cannot bind (an advertised name
        behind NAT) falls back to every interface."""
        try:
            self.server = await asyncio.start_server(self._serve, host, 0)
        except OSError:
            self.server = await asyncio.start_server(self._serve, None, 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        upstream: asyncio.StreamWriter | None = None
        try:
            up_reader, upstream = await asyncio.wait_for(
                asyncio.open_connection(*self.target), CONNECT_TIMEOUT_S)
            self.writers.add(upstream)
            await asyncio.gather(_pipe(reader, upstream), _pipe(up_reader, writer))
        except (OSError, asyncio.TimeoutError) as exc:
            log.info("tunnel to %s:%d: %s", *self.target, exc)
        finally:
            for w in (writer, upstream):
                if w is not None:
                    self.writers.discard(w)
                    w.close()

    def close(self) -> None:
        """Stop listening and cut every open connection (the sandbox ended)."""
        if self.server is not None:
            self.server.close()
        for w in list(self.writers):
            w.close()
        self.writers.clear()


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    """Copy until EOF, then half-close `dst` (the other direction may still have bytes)."""
    try:
        while data := await src.read(1 << 16):
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except (ConnectionError, OSError, RuntimeError):
        dst.close()
