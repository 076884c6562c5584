"""Prefixed identifiers, like Modal's: `ap-` app, `fu-` function, `fc-` call, `in-` input, ..."""

from __future__ import annotations

import secrets
import string

_ALPHABET = string.ascii_letters + string.digits
PREFIXES = {
    "app": "ap",
    "function": "fu",
    "call": "fc",
    "input": "in",
    "task": "ta",
    "image": "im",
    "volume": "vo",
    "secret": "st",
    "sandbox": "sb",
    "deployment": "de",
    "blob": "bl",
    "token": "tk",
    "dict": "di",
    "queue": "qu",
    "exec": "ex",
}


def new_id(kind: str, length: int = 22) -> str:
    """A fresh random id such as `fc-3Fj...` (base62 of 131 random bits; on the call path)."""
    n = int.from_bytes(secrets.token_bytes(17), "big")
    chars = []
    for _ in range(length):
        n, r = divmod(n, 62)
        chars.append(_ALPHABET[r])
    return f"{PREFIXES[kind]}-{''.join(chars)}"


def input_id(call_id: str, index: int) -> str:
    """The id of input `index` of a call: deterministic, so a resent chunk is recognised."""
    return f"in-{call_id[3:]}-{index}"
