"""Signatures on the thinking blocks this gateway returns. Anthropic's clients send thinking blocks
back with the next turn, signature included; a signature proves the block is what the model wrote,
so it goes back into the prompt as the model's reasoning. Any other block (Claude's own signatures,
an edited or forged one) is not this model's thinking: the gateway passes it on as text, never a 400.

The key is the gateway's own: 32 random bytes in `<state_dir>/gateway/thinking.key` (0600), made on
first use, so signatures stay valid across gateway restarts."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path

PREFIX = "lmx1."
_DOMAIN = b"lmx-thinking-v1\0"


class ThinkingSigner:
    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("a thinking key has at least 16 bytes")
        self._key = key

    @classmethod
    def from_state_dir(cls, state_dir: Path) -> "ThinkingSigner":
        return cls(_load_key(state_dir / "gateway" / "thinking.key"))

    def sign(self, thinking: str) -> str:
        mac = hmac.new(self._key, _DOMAIN + thinking.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
        return PREFIX + base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def verify(self, thinking: str, signature: object) -> bool:
        return isinstance(signature, str) and hmac.compare_digest(signature, self.sign(thinking))


def _load_key(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            key = f.read(64)
        if len(key) >= 16:
            return key
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = secrets.token_bytes(32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    try:
        os.link(tmp, path)  # first writer wins: two gateways starting at once share one key
    except FileExistsError:
        with open(path, "rb") as f:
            key = f.read(64)
    finally:
        os.unlink(tmp)
    return key
