"""`context_tokens` is held to the model's position limit (config.json's max_position_embeddings, or
its text_config's): above it, the worker gets the limit and the supervisor warns naming both
numbers, so a prompt past the positions the model has is refused as context_length_exceeded, never
prefilled into positions it never learned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from protocol import errors as E
from supervisor.admission.positions import context_tokens, position_limit

pytestmark = pytest.mark.timeout(120)

SENTENCE = "The quick brown fox jumps over the lazy dog. "  # 17 tokens


def _config(tmp_path: Path, cfg: dict) -> str:
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return str(tmp_path)


def test_the_limit_is_read_where_mlx_lm_reads_it(tmp_path: Path) -> None:
    assert position_limit(_config(tmp_path, {"max_position_embeddings": 2048})) == 2048
    assert position_limit(_config(tmp_path, {"text_config": {"max_position_embeddings": 8192}})) == 8192
    assert position_limit(_config(tmp_path, {"n_positions": 1024})) == 1024  # gpt2
    yarn = {"max_position_embeddings": 32768,
            "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
    assert position_limit(_config(tmp_path, yarn)) == 131072
    assert position_limit(_config(tmp_path, {"hidden_size": 64})) is None
    assert position_limit(str(tmp_path / "absent")) is None
    path = _config(tmp_path, {"max_position_embeddings": 2048})
    assert context_tokens(path, 4096) == (2048, 2048)
    assert context_tokens(path, 1024) == (1024, None)


def test_context_tokens_past_the_position_limit_is_clamped_with_a_warning(make_supervisor, tiny_model: Path) -> None:
    assert json.loads((tiny_model / "config.json").read_text())["max_position_embeddings"] == 2048
    sup = make_supervisor([{"id": "tiny", "path": str(tiny_model), "context_tokens": 4096}]).start()
    (warned,) = sup.events("model.context_clamped")
    assert (warned["context_tokens"], warned["position_limit"]) == (4096, 2048)
    assert "4096" in warned["message"] and "2048" in warned["message"]
    prompt = SENTENCE * 130  # ~2,200 tokens: inside context_tokens, past the positions
    assert 2048 < sup.client.count_tokens("tiny", prompt=prompt) < 4096
    with pytest.raises(E.BadRequest, match="context_tokens is 2048") as refused:
        sup.client.complete("tiny", prompt, max_tokens=2)
    assert refused.value.details["context_tokens"] == 2048
    assert sup.client.complete("tiny", SENTENCE * 100, max_tokens=2).usage["prompt_tokens"] > 1500
    assert sup.model("tiny")["state"] == "READY"
