"""A prompt longer than the model's `context_tokens` (the KV cache its memory estimate was admitted
for) is that request's BAD_REQUEST, refused before prefill — never a worker that dies on it and,
three deaths later, a model quarantined for everyone. Only the worker knows the token count (the
tokenizer): the supervisor hands it the limit in `init` (Init.context_tokens)."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol import errors as E
from protocol.messages import Init

pytestmark = pytest.mark.timeout(120)

CONTEXT_TOKENS = 128  # the canary's chat prompt fits; the long one below is ~1000 tokens


def test_init_carries_context_tokens_with_a_default_that_refuses_nothing() -> None:
    assert Init("m", "r", "/p", 1.0, 60.0).context_tokens == 0
    assert Init("m", "r", "/p", 1.0, 60.0, context_tokens=4096).to_wire()["context_tokens"] == 4096


@pytest.mark.parametrize("batch", [1, 8], ids=["one-at-a-time", "batched"])
def test_a_prompt_past_context_tokens_is_refused_alone_and_the_worker_lives(
        make_supervisor, tiny_model: Path, batch: int) -> None:
    sup = make_supervisor([{"id": "tiny", "path": str(tiny_model), "context_tokens": CONTEXT_TOKENS,
                            "max_batch_size": batch}]).start()
    before = sup.model("tiny")
    with pytest.raises(E.BadRequest, match="context_tokens"):
        sup.client.complete("tiny", "word " * 1000, max_tokens=4)
    assert sup.client.complete("tiny", "Hello", max_tokens=4).usage["completion_tokens"] >= 1
    after = sup.model("tiny")
    assert after["state"] == "READY"
    assert (after["worker_pid"], after["restarts"]) == (before["worker_pid"], before["restarts"])
