"""A model's kind: the config key and its detection from the snapshot, the kinds not served yet,
what admission accepts and budgets per kind, and the router's refusal of the other kind's requests
(all in-process; tests/test_embed_worker.py serves an embed model for real)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from protocol import errors as E
from protocol import limits
from protocol.messages import CountTokens, EmbedRequest, GenerateRequest
from supervisor import config, kinds
from supervisor.admission import admit, memory
from supervisor.control import router
from tests.snapshots import write_tiny_llama

pytestmark = pytest.mark.timeout(60)


def _parse(tmp_path: Path, **model: object) -> config.ModelConfig:
    lines = [f"{k} = {json.dumps(v)}" for k, v in {"id": "m", "path": str(tmp_path), **model}.items()]
    return config.parse("[[models]]\n" + "\n".join(lines), base_dir=tmp_path).models[0]


def _bert(path: Path, pooling: bool) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32, "intermediate_size": 64,
                                                  "num_attention_heads": 4, "max_position_embeddings": 128}))
    if pooling:
        (path / "1_Pooling").mkdir()
        (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32}))
    return path


def test_the_kind_is_generate_by_default_and_detected_from_the_snapshot(tmp_path: Path) -> None:
    assert _parse(write_tiny_llama(tmp_path / "llama")).kind == "generate"
    assert _parse(tmp_path / "missing").kind == "generate"  # admission names the missing snapshot
    st = _bert(tmp_path / "st", pooling=True)
    bare = _bert(tmp_path / "bare", pooling=False)
    (bare / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert _parse(st).kind == "embed" and _parse(bare).kind == "embed"
    assert kinds.embed_dims(st) == 32
    # The key overrides the detection; an embed model has no prefix cache.
    assert _parse(st, kind="generate").kind == "generate"
    forced = _parse(write_tiny_llama(tmp_path / "llama2"), kind="embed")
    assert forced.kind == "embed" and forced.prefix_cache_bytes == 0 and forced.prefix_cache_disk_bytes == 0


def test_a_generate_models_revision_does_not_move_with_the_kind_key(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "llama")
    assert _parse(path).revision == _parse(path, kind="generate").revision
    assert _parse(path, kind="embed").revision != _parse(path).revision


@pytest.mark.parametrize("kind, words", [("vision", "not supported yet"),
                                         ("chat", "expected one of generate, embed, rerank, vision")])
def test_kinds_not_served_are_config_errors_naming_the_key(tmp_path: Path, kind: str, words: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        _parse(tmp_path, kind=kind)
    assert err.value.key == "models[0].kind" and words in err.value.problem


def test_an_embed_model_refuses_a_prefix_cache_size(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="no prefix cache") as err:
        _parse(_bert(tmp_path / "st", pooling=True), prefix_cache_bytes=1 << 20)
    assert err.value.key == "models[0].prefix_cache_bytes"


def test_admission_checks_the_architecture_against_the_kinds_engine(tmp_path: Path) -> None:
    llama = _parse(write_tiny_llama(tmp_path / "llama"), kind="embed")
    refusal = asyncio.run(admit.integrity(llama, None))  # type: ignore[arg-type]  # no checksums: no store read
    assert isinstance(refusal, E.UnsupportedArchitecture)
    assert refusal.details["engine"] == "lmx-embed" and refusal.details["kind"] == "embed"
    assert asyncio.run(admit.integrity(_parse(tmp_path / "llama"), None)) is None  # type: ignore[arg-type]


def test_an_embed_estimate_budgets_one_forward_batch_not_a_kv_cache(tmp_path: Path) -> None:
    path = _bert(tmp_path / "st", pooling=True)
    (path / "model.safetensors").write_bytes(b"\0" * 1000)
    est = memory.estimate(str(path), 4096, kind="embed")
    batch = 4 * limits.EMBED_BATCH_TOKENS * (4 * 32 + 64 + 4 * 128)
    assert est["kv_cache"] == batch and est["total"] == 1000 + batch + memory.WORKER_OVERHEAD_BYTES
    assert est["kv_cache"] != memory.estimate(str(path), 4096)["kv_cache"]


def test_the_router_refuses_the_other_kinds_requests_naming_the_kind() -> None:
    gen = GenerateRequest("r", "e", prompt="hi")
    count = CountTokens("r", "e", prompt="hi")
    emb = EmbedRequest("r", "g", ["hi"])
    for req, kind in ((gen, "embed"), (count, "embed"), (emb, "generate")):
        with pytest.raises(E.BadRequest) as err:
            router._check_kind("x", kind, req)
        assert err.value.details == {"model": "x", "kind": kind} and f"kind {kind!r}" in err.value.message
    for req, kind in ((gen, "generate"), (count, "generate"), (emb, "embed")):
        router._check_kind("x", kind, req)  # served: no refusal
