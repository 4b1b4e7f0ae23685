"""An Embeddings reply's buffer: the float32 little-endian layout both ends agree on, and the
client's EmbedResult read from it. Plain Python (array), so no client needs numpy or mlx."""

from __future__ import annotations

import sys
from array import array
from dataclasses import dataclass

from protocol.messages import Embeddings


@dataclass
class EmbedResult:
    """What SupervisorClient.embed returns: one vector per input, in the inputs' order."""

    vectors: list[list[float]]
    dims: int
    prompt_tokens: int


def pack(rows: list[list[float]]) -> bytes:
    """Vectors as one little-endian float32 buffer (the worker writes numpy's own bytes; this is
    the reference layout, for tests and any other sender)."""
    flat = array("f", [x for row in rows for x in row])
    if sys.byteorder == "big":
        flat.byteswap()
    return flat.tobytes()


def unpack(data: bytes, dims: int) -> list[list[float]]:
    flat = array("f")
    flat.frombytes(data)
    if sys.byteorder == "big":
        flat.byteswap()
    return [flat[i:i + dims].tolist() for i in range(0, len(flat), dims)]


def result(reply: Embeddings) -> EmbedResult:
    return EmbedResult(unpack(reply.data, reply.dims), reply.dims, reply.prompt_tokens)
