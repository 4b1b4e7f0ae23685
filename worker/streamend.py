"""How a stream's text ends. mlx-lm's streaming detokenizers hold back the bytes that do not make a
whole UTF-8 character yet; their finalize() decodes what they hold with errors="replace". A stream
cut short inside a character (max_tokens, or the EOS after a token that starts one) would so end in
U+FFFD for bytes the model never finished, and a client that sends the answer back as history
would send a character that was never written. Here the end flushes what is held less that
unfinished tail: a U+FFFD still comes for bytes that are invalid, or one the model wrote whole."""

from __future__ import annotations

import codecs
from typing import Any

_REPLACEMENT = "\ufffd"
_HEX = frozenset("0123456789abcdefABCDEF")


def unfinished(data: bytes) -> int:
    """How many bytes at the end of `data` begin a UTF-8 character that more bytes would finish."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    decoder.decode(data, final=False)
    return len(decoder.getstate()[0])


def finish(detok: Any) -> str:
    """Flush the detokenizer (finalize) and return its last segment, without the replacement its
    finalize wrote for an unfinished UTF-8 tail. Python's decoder (the BPE and SentencePiece
    detokenizers) writes one U+FFFD for such a tail; a tokenizer's own decode (the naive
    detokenizer's) may write one per byte, so up to that many go."""
    held, per_byte = _held(detok)
    cut = unfinished(held)
    detok.finalize()
    piece = detok.last_segment
    if cut:
        replaced = len(piece) - len(piece.rstrip(_REPLACEMENT))
        piece = piece[:len(piece) - min(replaced, cut if per_byte else 1)]
    return piece


def _held(detok: Any) -> tuple[bytes, bool]:
    """(the bytes the detokenizer holds back from its text, whether its finalize decodes them with
    the tokenizer's own decode). Nothing for a detokenizer of another kind: finalize as it is."""
    from mlx_lm.tokenizer_utils import (
        BPEStreamingDetokenizer,
        NaiveStreamingDetokenizer,
        SPMStreamingDetokenizer,
        _byte_decoder,
    )

    if isinstance(detok, BPEStreamingDetokenizer):
        byte_of = _byte_decoder()
        return b"".join(bytes([byte_of[c]]) if c in byte_of else c.encode() for c in detok._unflushed), False
    if isinstance(detok, SPMStreamingDetokenizer):
        return bytes(detok._unflushed), False
    if isinstance(detok, NaiveStreamingDetokenizer):
        return token_bytes(detok._tokenizer, detok._current_tokens), True
    return b"", False


def token_bytes(tokenizer: Any, ids: list[int]) -> bytes:
    """The bytes `ids` stand for, read from their vocabulary strings: SentencePiece's byte tokens
    (<0xNN>), byte-level BPE's characters, else the string itself."""
    from mlx_lm.tokenizer_utils import _byte_decoder

    byte_of = _byte_decoder()
    out = bytearray()
    for token in tokenizer.convert_ids_to_tokens(list(ids)):
        token = token if isinstance(token, str) else ""
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">") and _HEX.issuperset(token[3:5]):
            out.append(int(token[3:5], 16))
        elif all(c in byte_of for c in token):
            out.extend(byte_of[c] for c in token)
        else:
            out.extend(token.replace("\u2581", " ").encode())
    return bytes(out)
