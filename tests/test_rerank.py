"""The rerank kind end to end on a tiny random BERT cross-encoder: the worker's scores against a
float64 numpy forward written here, the kind's detection and config, and one supervisor serving it
beside a tiny generate model (the client's rerank verb, the canary, truncation, the refusals by
kind and by bounds, a SIGKILL mid-request that fails that request alone)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from protocol import errors as E
from protocol import rerank as wire
from protocol.messages import CountTokens, EmbedRequest, GenerateRequest, RerankRequest
from supervisor import config, kinds
from supervisor.admission import admit, architectures, memory
from supervisor.control import router
from tests.harness import RunningSupervisor, kill_mid_request, process_gone
from tests.reference_bert import ReferenceBert
from tests.snapshots import write_tiny_bert, write_tiny_cross_encoder, write_tiny_llama

pytestmark = pytest.mark.timeout(120)

QUERY = "what is the capital of france"
DOCUMENTS = ["the capital of france is paris", "the weather today is sunny", "a small model writes words",
             "paris is a city on the river seine", ""]
LONG = " ".join(["the supervisor starts the worker and watches its health"] * 12)  # past 64 positions


@pytest.fixture(scope="module")
def cross(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_cross_encoder(tmp_path_factory.mktemp("models") / "cross")


@pytest.fixture(scope="module")
def xlmr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_cross_encoder(tmp_path_factory.mktemp("models") / "xlmr", roberta=True)


def _reference(path: Path, query: str, documents: list[str]) -> np.ndarray:
    """BERT's (or XLM-RoBERTa's) sequence-classification forward in float64 numpy from the
    snapshot's files alone (tests/reference_bert.py's encoder, with segments; RoBERTa's positions
    from its padding id + 1), then a dense + tanh on the first token (BERT's pooler, RoBERTa's
    classifier.dense) and the one-label output. The pairs are tokenized here, longest-first to the
    position limit, as transformers' tokenizer(query, document, truncation=True) does."""
    from tokenizers import Tokenizer

    bert = ReferenceBert(path)
    roberta = bert.cfg["model_type"] == "xlm-roberta"
    first = bert.cfg["pad_token_id"] + 1 if roberta else 0
    head = ("classifier.dense", "classifier.out_proj") if roberta else ("pooler.dense", "classifier")
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.enable_truncation(bert.cfg["max_position_embeddings"] - first)
    out = []
    for doc in documents:
        enc = tok.encode(query, doc)
        x = bert.encode(enc.ids, enc.type_ids, first)
        out.append(float(bert.lin(np.tanh(bert.lin(x[0], head[0])), head[1])[0]))
    return np.array(out)


@pytest.mark.parametrize("roberta", [False, True], ids=["bert", "xlm-roberta"])
def test_the_workers_scores_match_an_independent_forward_pass(cross: Path, xlmr: Path, roberta: bool) -> None:
    from worker import rerank

    path = xlmr if roberta else cross
    engine = rerank.RerankEngine()
    engine.load(str(path))
    ids, types, cut = engine.pairs(QUERY, [*DOCUMENTS, LONG])
    assert cut == [len(DOCUMENTS)] and len(ids[-1]) == 64  # the long one alone, cut at the position limit
    if roberta:  # [CLS] q [SEP] [SEP] d [SEP], one segment
        assert set(types[0]) == {0} and ids[0].count(3) == 3
    else:  # [CLS] q [SEP] | d [SEP]
        assert ids[0][0] == 2 and types[0].count(1) == len(ids[0]) - types[0].index(1) > 1
    got = engine.score(ids, types)
    want = _reference(path, QUERY, [*DOCUMENTS, LONG])
    assert np.abs(got - want).max() < 1e-4, (got, want)
    assert np.ptp(want) > 0.1  # the documents do score differently: the check could fail
    # Padding in a shared pass changes nothing: one pass of all equals a pass per pair.
    alone = np.array([engine.score([i], [t])[0] for i, t in zip(ids, types)])
    assert np.abs(alone - got).max() < 1e-5
    # The supervisor's detection and registry name what the worker implements.
    assert architectures.RERANK_TYPES == rerank.TYPES and rerank.ARCHITECTURES <= kinds.CROSS_ENCODERS
    assert dict([architectures.RERANK_ENGINE]) == {rerank.ENGINE[0].replace("_", "-"): rerank.ENGINE[1]}


def test_a_snapshot_that_is_no_cross_encoder_fails_its_load_saying_why(tmp_path: Path, cross: Path) -> None:
    from worker import rerank

    with pytest.raises(ValueError, match="no cross-encoder"):
        rerank.RerankEngine().load(str(write_tiny_bert(tmp_path / "bert")))
    two = write_tiny_cross_encoder(tmp_path / "two")
    cfg = json.loads((two / "config.json").read_text())
    (two / "config.json").write_text(json.dumps({**cfg, "id2label": {"0": "NO", "1": "YES"}}))
    with pytest.raises(ValueError, match="one label; this classifier has 2"):
        rerank.RerankEngine().load(str(two))


def _parse(path: Path, **model: object) -> config.ModelConfig:
    lines = [f"{k} = {json.dumps(v)}" for k, v in {"id": "m", "path": str(path), **model}.items()]
    return config.parse("[[models]]\n" + "\n".join(lines), base_dir=path.parent).models[0]


def test_the_kind_is_detected_from_the_architecture_and_the_key_overrides_it(tmp_path: Path, cross: Path) -> None:
    assert _parse(cross).kind == "rerank"
    assert _parse(write_tiny_bert(tmp_path / "bert")).kind == "embed"
    two = write_tiny_cross_encoder(tmp_path / "two")
    cfg = json.loads((two / "config.json").read_text())
    (two / "config.json").write_text(json.dumps({**cfg, "id2label": {"0": "NO", "1": "YES"}}))
    assert _parse(two).kind == "embed"  # a two-label classifier is no reranker: its encoder embeds
    assert _parse(cross, kind="embed").kind == "embed"
    forced = _parse(write_tiny_bert(tmp_path / "bert2"), kind="rerank")
    assert forced.kind == "rerank" and forced.prefix_cache_bytes == 0 and forced.prefix_cache_disk_bytes == 0
    with pytest.raises(config.ConfigError, match="a rerank model has no prefix cache"):
        _parse(cross, prefix_cache_bytes=1 << 20)


def test_admission_and_the_estimate_of_a_rerank_model(tmp_path: Path, cross: Path) -> None:
    llama = _parse(write_tiny_llama(tmp_path / "llama"), kind="rerank")
    refusal = asyncio.run(admit.integrity(llama, None))  # type: ignore[arg-type]  # no checksums: no store read
    assert isinstance(refusal, E.UnsupportedArchitecture)
    assert refusal.details["engine"] == "lmx-rerank" and refusal.details["kind"] == "rerank"
    assert asyncio.run(admit.integrity(_parse(cross), None)) is None  # type: ignore[arg-type]
    # An XLM-RoBERTa cross-encoder (a bge-reranker's layout) is detected and admitted alike.
    roberta = write_tiny_cross_encoder(tmp_path / "xlmr", roberta=True)
    assert _parse(roberta).kind == "rerank"
    assert asyncio.run(admit.integrity(_parse(roberta), None)) is None  # type: ignore[arg-type]
    # One forward batch's activations, as an embed model's; no KV cache for the context.
    assert memory.estimate(str(cross), 4096, kind="rerank") == memory.estimate(str(cross), 4096, kind="embed")
    assert memory.estimate(str(cross), 4096, kind="rerank") != memory.estimate(str(cross), 4096)


def test_the_router_refuses_the_other_kinds_requests_naming_the_kind() -> None:
    rr = RerankRequest("r", "x", "q", ["d"])
    for req in (GenerateRequest("r", "x", prompt="hi"), CountTokens("r", "x", prompt="hi"), EmbedRequest("r", "x", ["hi"])):
        with pytest.raises(E.BadRequest, match="kind 'rerank': it serves rerank scores") as err:
            router._check_kind("x", "rerank", req)
        assert err.value.details == {"model": "x", "kind": "rerank"}
    for kind in ("generate", "embed"):
        with pytest.raises(E.BadRequest, match=f"kind '{kind}'.*not a rerank request"):
            router._check_kind("x", kind, rr)
    router._check_kind("x", "rerank", rr)


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory, cross: Path, tiny_model: Path):
    s = RunningSupervisor(tmp_path_factory.mktemp("rerank"), [
        {"id": "rr", "path": str(cross)},  # its kind detected from config.json's architectures
        {"id": "gen", "path": str(tiny_model), "max_batch_size": 2},
    ]).start(timeout_s=90)
    yield s
    s.stop()


def test_a_rerank_worker_answers_through_the_client_after_its_canary(sup: RunningSupervisor, cross: Path) -> None:
    status = {m["id"]: m for m in sup.status()["models"]}
    assert (status["rr"]["kind"], status["gen"]["kind"]) == ("rerank", "generate")
    assert status["rr"]["canary"]["text"].startswith("scores ")
    assert [e for e in sup.events("model.canary_passed") if e.get("model") == "rr"], "READY without its canary"
    result = sup.client.rerank("rr", QUERY, [*DOCUMENTS, LONG])
    assert isinstance(result, wire.RerankResult) and len(result.scores) == len(DOCUMENTS) + 1
    want = _reference(cross, QUERY, [*DOCUMENTS, LONG])
    assert np.abs(np.array(result.scores) - want).max() < 1e-4
    assert result.truncated == [len(DOCUMENTS)]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(cross / "tokenizer.json"))
    tok.enable_truncation(64)
    assert result.prompt_tokens == sum(len(tok.encode(QUERY, d).ids) for d in [*DOCUMENTS, LONG])
    again = sup.client.rerank("rr", QUERY, DOCUMENTS[:2])
    assert again.scores == result.scores[:2] and again.truncated == []


def test_requests_of_the_other_kind_are_refused_naming_it(sup: RunningSupervisor) -> None:
    with pytest.raises(E.BadRequest, match="kind 'rerank'") as gen_to_rerank:
        sup.client.complete("rr", "Hello", max_tokens=2)
    with pytest.raises(E.BadRequest, match="kind 'generate'") as rerank_to_gen:
        sup.client.rerank("gen", "q", ["d"])
    with pytest.raises(E.BadRequest, match="kind 'rerank'"):
        sup.client.embed("rr", ["hello"])
    assert gen_to_rerank.value.details["kind"] == "rerank" and rerank_to_gen.value.details["kind"] == "generate"
    assert sup.model("rr")["restarts"] == 0 and sup.model("gen")["restarts"] == 0


def test_inputs_past_the_bounds_are_refused_before_the_wire(sup: RunningSupervisor) -> None:
    client = sup.client
    for query, docs, words in (("q", ["x"] * (wire.MAX_RERANK_DOCUMENTS + 1), "entries"), ("q", [], "entries"),
                               ("", ["x"], "query has 0"), ("q", ["x" * (wire.MAX_RERANK_DOCUMENT_CHARS + 1)], "characters"),
                               ("q" * 4000, ["x"] * 600, "comes to"), ("q", ["a", 1], "expected")):
        with pytest.raises(E.BadRequest, match=words):
            client.rerank("rr", query, docs)
    assert not [e for e in sup.events("client.bad_request")]  # nothing of those reached the supervisor


def test_sigkill_of_the_rerank_worker_mid_request_fails_that_request_alone(sup: RunningSupervisor) -> None:
    """The worker is stopped (SIGSTOP) so that the request is surely in its hands, unanswered, when
    it is killed: a tiny model would otherwise answer before any kill could land."""
    victim = sup.model("rr")["worker_pid"]
    err, beside = kill_mid_request(sup, "rr", lambda c: c.rerank("rr", QUERY, DOCUMENTS, timeout_s=60), "gen",
                                   stop_first=True)
    assert isinstance(err, E.WorkerCrashed), err
    assert err.details["signal"] == "SIGKILL"
    assert beside.usage["completion_tokens"] >= 1
    assert sup.model("gen")["restarts"] == 0
    sup.wait_model("rr", lambda m: m["state"] == "READY" and m["worker_pid"] != victim, 60, "rr READY again")
    assert process_gone(victim)
    assert len(sup.client.rerank("rr", QUERY, ["back again"]).scores) == 1
