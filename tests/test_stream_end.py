"""A stream's end never shows a character the model had only begun (worker.streamend): with a real
byte-level BPE tokenizer, whose byte tokens split "é" in two, an answer cut at max_tokens, or ended
by EOS, between those two bytes ends before the character, not in U+FFFD, alone, in the batch and
through the client; a U+FFFD the model wrote whole, or bytes it wrote invalid, still show. Usage
counts as mlx_lm.server counts (docs/gateway.md): every generated token, the EOS that ended it too."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from protocol.client import SupervisorClient
from protocol.messages import GenerateRequest
from tests.harness import RunningSupervisor
from tests.snapshots import write_tiny_llama
from worker.streamend import finish, unfinished
from worker.streams import Stream

pytestmark = pytest.mark.timeout(120)

SCRIPT = "Il a dit: café, déjà vu."
CUT = "Il a dit: caf"  # cut between the two bytes of its first "é"


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "bpe")


@pytest.fixture(scope="module")
def tok(snapshot: Path):
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, load

    wrapper = load(snapshot)
    assert isinstance(wrapper.detokenizer, BPEStreamingDetokenizer)
    return wrapper


def _ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def _cut_before_last_byte(tok, text: str) -> list[int]:
    """`text`'s tokens but its last: that one finishes the multi-byte character it ends with."""
    ids = _ids(tok, text)
    assert tok.convert_ids_to_tokens(ids[-1:]) == ["©"], "the vocab must split é into byte tokens"
    return ids[:-1]


def _run(tok, ids: list[int], finish_reason: str, eos: bool = False) -> tuple[Stream, str, int]:
    """Feed `ids` to a Stream as the worker does; the last ends it with `finish_reason` (with
    eos: one more token, the EOS, ends it). Returns (the stream, the text shown, tokens counted)."""
    stream = Stream(GenerateRequest("r", "m", prompt="p", max_tokens=len(ids)), tok.detokenizer, [1, 2, 3])
    shown, counted = [], 0
    if eos:
        steps = [(t, None) for t in ids] + [(next(iter(tok.eos_token_ids)), "stop")]
    else:
        steps = [(t, None) for t in ids[:-1]] + [(ids[-1], finish_reason)]
    for token, reason in steps:
        text, tokens, _ = stream.on_token(token, reason, 0.0)
        shown.append(text)
        counted += tokens
    return stream, "".join(shown), counted


def test_unfinished_counts_only_a_tail_more_bytes_would_finish() -> None:
    assert unfinished(b"caf\xc3") == 1
    assert unfinished("€".encode()[:2]) == 2 and unfinished("😀".encode()[:3]) == 3
    assert unfinished("café".encode()) == 0
    assert unfinished(b"caf\xff") == unfinished(b"caf\x80") == unfinished(b"\xc3(") == 0  # invalid, not unfinished


def test_max_tokens_inside_a_character_ends_before_it(tok) -> None:
    ids = _cut_before_last_byte(tok, CUT + "é")
    stream, shown, counted = _run(tok, ids, "length")
    assert shown == stream.text == CUT
    assert stream.usage()["completion_tokens"] == counted == len(ids)


def test_eos_after_half_a_character_ends_before_it_and_counts_the_eos(tok) -> None:
    ids = _cut_before_last_byte(tok, CUT + "é")
    stream, shown, counted = _run(tok, ids, "stop", eos=True)
    assert shown == stream.text == CUT
    assert stream.usage()["completion_tokens"] == counted == len(ids) + 1
    assert stream.tokens == len(ids)  # decode speed counts the tokens with text, not the EOS


def test_whole_characters_and_real_replacements_still_show(tok) -> None:
    ids = _ids(tok, SCRIPT)
    assert _run(tok, ids, "length")[1] == SCRIPT
    assert _run(tok, ids, "stop", eos=True)[1] == SCRIPT
    # A U+FFFD the model wrote (its three bytes), and a byte no character starts with (0xFF: "ÿ"
    # in the byte-level alphabet), end the text as they are: nothing there was cut short.
    real = _ids(tok, "caf\ufffd")
    assert _run(tok, real, "length")[1] == "caf\ufffd"
    invalid = _ids(tok, "caf") + tok.convert_tokens_to_ids(["ÿ"])
    assert _run(tok, invalid, "length")[1] == "caf\ufffd"
    assert _run(tok, invalid + _cut_before_last_byte(tok, "é"), "length")[1] == "caf\ufffd"


def test_the_naive_and_sentencepiece_detokenizers_end_the_same_way(tok) -> None:
    from mlx_lm.tokenizer_utils import NaiveStreamingDetokenizer, SPMStreamingDetokenizer

    naive = NaiveStreamingDetokenizer(tok._tokenizer)
    for t in _cut_before_last_byte(tok, CUT + "é"):
        naive.add_token(t)
    assert naive.last_segment + finish(naive) == CUT
    spm = SPMStreamingDetokenizer(_byte_fallback_tokenizer())
    for t in (4, 5 + 0xC3):  # "▁a", then the first byte of "é"
        spm.add_token(t)
    assert spm.last_segment + finish(spm) == "a"
    spm.reset()
    for t in (4, 5 + 0xC3, 5 + 0xA9):
        spm.add_token(t)
    assert spm.last_segment + finish(spm) == "aé"


def _byte_fallback_tokenizer():
    """A SentencePiece-style vocab (▁ for spaces, <0xNN> byte tokens) in a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "▁": 1, "a": 2, "b": 3, "▁a": 4, **{f"<0x{b:02X}>": 5 + b for b in range(256)}}
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "a")], unk_token="<unk>", byte_fallback=True))
    raw.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")


# --- end to end: a real worker writing a script through the real detokenizer -------------------


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory, snapshot: Path):
    command = [sys.executable, "-m", "tests.scripted_worker", "--script", SCRIPT]
    s = RunningSupervisor(tmp_path_factory.mktemp("streamend"), [
        {"id": "scripted", "path": str(snapshot), "canary": {"prompt": "Hi", "max_tokens": 4},
         "worker_command": command}]).start()
    yield s
    s.cleanup()


def _generate(sup: RunningSupervisor, max_tokens: int, n: int = 1) -> list[tuple[list, object]]:
    async def one(client: SupervisorClient) -> tuple[list, object]:
        stream = client.generate("scripted", "Say it.", max_tokens=max_tokens)
        chunks = [c async for c in stream]
        return chunks, stream.result

    async def run() -> list[tuple[list, object]]:
        async with SupervisorClient(state_dir=sup.state_dir) as client:
            return list(await asyncio.gather(*(one(client) for _ in range(n))))

    return asyncio.run(run())


def test_through_the_client_alone_and_in_the_batch(sup: RunningSupervisor, tok) -> None:
    cut = len(_cut_before_last_byte(tok, CUT + "é"))
    for n in (1, 3):  # alone (the solo path), then three at once (the batch)
        for chunks, result in _generate(sup, cut, n):
            assert (result.text, result.finish_reason) == (CUT, "length")
            assert "".join(c.text for c in chunks) == CUT
            assert result.usage["completion_tokens"] == sum(c.tokens for c in chunks) == cut
        for chunks, result in _generate(sup, 64, n):
            assert (result.text, result.finish_reason) == (SCRIPT, "stop")
            assert result.usage["completion_tokens"] == sum(c.tokens for c in chunks) == len(_ids(tok, SCRIPT)) + 1
