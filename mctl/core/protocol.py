"""Wire framing between clients, workers and the control plane.

A message is one binary WebSocket frame: a JSON header plus a list of opaque byte payloads (pickled
arguments and results). The control plane never unpickles payloads; it only moves bytes.

    u32 header length | header JSON | u32 payload count | u32 length per payload | payloads
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

_U32 = struct.Struct("<I")

# Payloads above this travel through the blob store by reference instead of inline.
BLOB_THRESHOLD = 256 * 1024
# Largest WebSocket frame; chunks of inputs are cut well below it.
MAX_FRAME = 64 * 1024 * 1024
# Target size of one chunk of inputs or outputs.
CHUNK_BYTES = 2 * 1024 * 1024


def blob_id_from_hex(hexdigest: str) -> str:
    """Blobs are content-addressed: `bl-` and the first 40 hex digits of their SHA-256."""
    return "bl-" + hexdigest[:40]


def blob_id(data: bytes) -> str:
    return blob_id_from_hex(hashlib.sha256(data).hexdigest())


def encode(header: dict[str, Any], payloads: list[bytes] = ()) -> bytes:  # type: ignore[assignment]
    head = json.dumps(header, separators=(",", ":")).encode()
    n = len(payloads)
    return b"".join((
        _U32.pack(len(head)), head, _U32.pack(n),
        struct.pack(f"<{n}I", *map(len, payloads)), *payloads,
    ))


def decode(frame: bytes) -> tuple[dict[str, Any], list[bytes]]:
    (hlen,) = _U32.unpack_from(frame, 0)
    header = json.loads(frame[4:4 + hlen])
    pos = 4 + hlen
    (n,) = _U32.unpack_from(frame, pos)
    pos += 4
    lens = struct.unpack_from(f"<{n}I", frame, pos)
    pos += 4 * n
    payloads = []
    for length in lens:
        payloads.append(frame[pos:pos + length])
        pos += length
    return header, payloads
