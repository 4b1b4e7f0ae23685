"""Codec cost per hot message: today's (protocol.codec + messages.from_wire) against msgspec typed
structs on the same wire ([tag, {fields}] in msgpack, unknown fields refused). Prints encode and
decode µs per message for each, and whether msgspec's bytes are the same as today's.

    .venv/bin/python bench/codec.py   (needs `pip install msgspec`; not a project dependency)
"""

from __future__ import annotations

import sys
import timeit
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import msgspec  # noqa: E402

from protocol import codec  # noqa: E402
from protocol import messages as M  # noqa: E402

ROUNDS = 20_000


class Chunk(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    request_id: str
    text: str
    tokens: int = 1
    reasoning: str = ""
    tool_calls: list[dict] = msgspec.field(default_factory=list)
    logprobs: Optional[list[dict]] = None


class Chunks(msgspec.Struct, forbid_unknown_fields=True):
    items: list[list]


class Final(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    request_id: str
    text: str
    finish_reason: str
    usage: dict = msgspec.field(default_factory=dict)
    timings: dict = msgspec.field(default_factory=dict)
    reasoning: str = ""
    tool_calls: list[dict] = msgspec.field(default_factory=list)
    logprobs: Optional[list[dict]] = None
    stop_sequence: Optional[str] = None


class Heartbeat(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    progress: int
    phase: str
    memory: dict = msgspec.field(default_factory=dict)
    cache: dict = msgspec.field(default_factory=dict)


class GenerateRequest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    request_id: str
    model: str
    prompt: Optional[str] = None
    messages: Optional[list[dict]] = None
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: list[str] = msgspec.field(default_factory=list)
    timeout_s: Optional[float] = None


SAMPLES: list[tuple[M.Message, type, str]] = [
    (M.Chunk("r" * 32, " token", 1), Chunk, M.Chunk.TAG),
    (M.Chunks([["r" * 32, " tok", 1] for _ in range(16)]), Chunks, M.Chunks.TAG),
    (M.Final("r" * 32, "text " * 50, "stop", {"prompt_tokens": 30, "completion_tokens": 50},
             {"total_s": 0.5, "ttft_s": 0.05}), Final, M.Final.TAG),
    (M.Heartbeat(12345, "decode", {"rss_bytes": 1 << 30, "active_bytes": 1 << 29}), Heartbeat, M.Heartbeat.TAG),
    (M.GenerateRequest("r" * 32, "smollm2", messages=[{"role": "user", "content": "hello " * 40}],
                       max_tokens=128, stop=["\n\n"]), GenerateRequest, M.GenerateRequest.TAG),
]
TABLE = {**M.TO_SUPERVISOR_FROM_WORKER, **M.TO_WORKER}


def _us(fn: Any) -> float:
    return min(timeit.repeat(fn, number=ROUNDS, repeat=5)) / ROUNDS * 1e6


def main() -> None:
    enc = msgspec.msgpack.Encoder()
    outer = msgspec.msgpack.Decoder(tuple[str, msgspec.Raw])
    print(f"{'message':<10} {'today enc':>10} {'today dec':>10} {'msgspec enc':>12} {'msgspec dec':>12}  same bytes")
    for msg, spec_cls, tag in SAMPLES:
        frames = codec.encode(msg)
        table = TABLE if tag in TABLE else M.TO_SUPERVISOR_FROM_CLIENT
        inner = msgspec.msgpack.Decoder(spec_cls)
        spec_msg = msgspec.convert(msg.to_wire(), spec_cls)

        def spec_decode(body: bytes = frames[1]) -> Any:
            got_tag, raw = outer.decode(body)
            return inner.decode(raw)

        spec_body = enc.encode((tag, spec_msg))
        print(f"{tag:<10} {_us(lambda: codec.encode(msg)):>10.2f} {_us(lambda: codec.decode(frames, table)):>10.2f} "
              f"{_us(lambda: enc.encode((tag, spec_msg))):>12.2f} {_us(spec_decode):>12.2f}  "
              f"{spec_body == frames[1]}")


if __name__ == "__main__":
    main()
