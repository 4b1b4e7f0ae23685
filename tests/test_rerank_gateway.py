"""`POST /v1/rerank` (and `/rerank`) end to end: httpx against a real lmx-gateway over a real
supervisor serving a tiny random BERT cross-encoder beside a tiny generate model. The results
sorted by score, relevance_score the sigmoid of the supervisor's logit, top_n, return_documents,
{"text": ...} documents, the truncated ones named, and bad inputs as 400s naming the field. What
the scores must be is tests/test_rerank.py's (against an independent numpy forward)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from protocol import rerank as wire
from tests.snapshots import write_tiny_cross_encoder
from tests.test_gateway import supervised_gateway

pytestmark = pytest.mark.timeout(120)

QUERY = "what is the capital of france"
DOCUMENTS = ["the capital of france is paris", "the weather today is sunny", "a small model writes words",
             "paris is a city on the river seine"]
LONG = " ".join(["the supervisor starts the worker and watches its health"] * 12)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    root = tmp_path_factory.mktemp("gateway-rerank")
    cross = write_tiny_cross_encoder(root / "cross")
    yield from supervised_gateway(root, [{"id": "rr", "path": str(cross)}, {"id": "gen", "path": str(tiny_model)}])


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_results_are_sorted_by_the_supervisors_scores(gw) -> None:
    sup, gateway = gw
    direct = sup.client.rerank("rr", QUERY, DOCUMENTS)
    r = gateway.http.post("/v1/rerank", json={"model": "rr", "query": QUERY, "documents": DOCUMENTS})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model"] == "rr" and out["id"].startswith("rerank-") and out["truncated"] == []
    order = sorted(range(len(DOCUMENTS)), key=lambda i: -direct.scores[i])
    assert [x["index"] for x in out["results"]] == order
    for x in out["results"]:
        assert set(x) == {"index", "relevance_score"}  # no document unless asked
        assert abs(x["relevance_score"] - _sigmoid(direct.scores[x["index"]])) < 1e-9
    scores = [x["relevance_score"] for x in out["results"]]
    assert scores == sorted(scores, reverse=True) and all(0.0 < s < 1.0 for s in scores)
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] == direct.prompt_tokens > len(DOCUMENTS)


def test_top_n_return_documents_text_objects_and_the_short_path(gw) -> None:
    _, gateway = gw
    full = gateway.http.post("/v1/rerank", json={"model": "rr", "query": QUERY, "documents": DOCUMENTS}).json()
    docs = [{"text": d} if i % 2 else d for i, d in enumerate(DOCUMENTS)]
    r = gateway.http.post("/rerank", json={"model": "rr", "query": QUERY, "documents": docs, "top_n": 2,
                                           "return_documents": True, "user": "someone"})
    assert r.status_code == 200, r.text
    top = r.json()["results"]
    assert [x["index"] for x in top] == [x["index"] for x in full["results"][:2]]
    assert all(x["document"] == {"text": DOCUMENTS[x["index"]]} for x in top)
    many = gateway.http.post("/v1/rerank", json={"model": "rr", "query": QUERY, "documents": DOCUMENTS,
                                                 "top_n": 99}).json()
    assert len(many["results"]) == len(DOCUMENTS)  # top_n past the documents: all of them
    cut = gateway.http.post("/v1/rerank", json={"model": "rr", "query": QUERY, "documents": ["paris", LONG]}).json()
    assert cut["truncated"] == [1]


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"model": "rr", "documents": ["a"]}, "query", "query"),
    ({"model": "rr", "query": "", "documents": ["a"]}, "query", "non-empty"),
    ({"model": "rr", "query": "q"}, "documents", "non-empty list"),
    ({"model": "rr", "query": "q", "documents": []}, "documents", "non-empty list"),
    ({"model": "rr", "query": "q", "documents": "a"}, "documents", "non-empty list"),
    ({"model": "rr", "query": "q", "documents": ["a", 1]}, "documents", "documents[1]"),
    ({"model": "rr", "query": "q", "documents": [{"title": "a"}]}, "documents", "documents[0]"),
    ({"model": "rr", "query": "q", "documents": ["a"], "top_n": 0}, "top_n", "positive"),
    ({"model": "rr", "query": "q", "documents": ["a"], "top_n": "3"}, "top_n", "positive"),
    ({"model": "rr", "query": "q", "documents": ["a"], "return_documents": "yes"}, "return_documents", "boolean"),
    ({"model": "rr", "query": "q", "documents": ["a"], "max_tokens_per_doc": 64}, "max_tokens_per_doc", "cut"),
    ({"model": "rr", "query": "q", "documents": ["a"], "rank_fields": ["title"]}, "rank_fields", "ranked"),
    ({"model": "rr", "query": "q", "documents": ["a"], "truncate": "END"}, "truncate", "unknown field"),
    ({"model": "rr", "query": "q", "documents": ["x"] * (wire.MAX_RERANK_DOCUMENTS + 1)}, "documents", "entries"),
    ({"model": "rr", "query": "q", "documents": ["x" * (wire.MAX_RERANK_DOCUMENT_CHARS + 1)]}, "documents",
     "characters"),
    ({"query": "q", "documents": ["a"]}, "model", "model"),
])
def test_bad_inputs_are_400s_naming_the_field(gw, body: dict, param: str, words: str) -> None:
    _, gateway = gw
    r = gateway.http.post("/v1/rerank", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["type"], err["code"], err["param"]) == ("invalid_request_error", "BAD_REQUEST", param), err
    assert words in err["message"]


def test_the_other_kind_and_an_unknown_model(gw) -> None:
    sup, gateway = gw
    r = gateway.http.post("/v1/rerank", json={"model": "gen", "query": "q", "documents": ["a"]})
    assert r.status_code == 400 and "kind 'generate'" in r.json()["error"]["message"]
    r = gateway.http.post("/v1/rerank", json={"model": "nope", "query": "q", "documents": ["a"]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "UNKNOWN_MODEL"
    for path, body in (("/v1/chat/completions", {"model": "rr", "messages": [{"role": "user", "content": "hi"}]}),
                       ("/v1/embeddings", {"model": "rr", "input": "hi"})):
        r = gateway.http.post(path, json=body)
        assert r.status_code == 400 and "kind 'rerank'" in r.json()["error"]["message"], r.text
    assert sup.model("rr")["restarts"] == 0 and sup.model("gen")["restarts"] == 0


def test_keys_scope_rerank_to_their_models_and_are_charged_its_tokens(gw) -> None:
    """Last in the module: once a key exists, the loopback gateway wants one for every request."""
    from tests.harness import wait_until
    from tests.test_gateway_keys import new_key

    sup, gateway = gw
    scoped, admin = new_key(sup.state_dir, "rr-only", "--model", "rr"), new_key(
        sup.state_dir, "ops", "--scope", "inference", "--scope", "admin")
    body = {"model": "rr", "query": QUERY, "documents": DOCUMENTS}
    wait_until(lambda: gateway.http.post("/v1/rerank", json=body).status_code == 401, 5, "keys required")
    ok = gateway.http.post("/v1/rerank", json=body, headers={"authorization": f"Bearer {scoped}"})
    assert ok.status_code == 200, ok.text
    other = gateway.http.post("/rerank", json={**body, "model": "gen"}, headers={"x-api-key": scoped})
    assert other.status_code == 404 and other.json()["error"]["code"] == "UNKNOWN_MODEL"  # not its model

    def charged() -> float | None:  # as the response ends, which may be just after the client has it
        text = gateway.http.get("/metrics", headers={"x-api-key": admin}).text
        found = re.search(r'^lmx_gateway_tokens_total\{key="rr-only",kind="prompt"\} (\S+)$', text, re.M)
        return float(found.group(1)) if found and float(found.group(1)) > 0 else None

    assert wait_until(charged, 5, "the key charged") == ok.json()["usage"]["prompt_tokens"]


def test_docs_list_every_rerank_field() -> None:
    from gateway import fields

    doc = (Path(__file__).resolve().parents[1] / "docs" / "gateway.md").read_text()
    section = doc[doc.index("#### `POST /v1/rerank`"):]
    section = section[:section.index("\n#### ")]
    named = {n for row in re.findall(r"^\| ((?:`[a-z_]+`(?:, )?)+) \|", section, re.M)
             for n in re.findall(r"`([a-z_]+)`", row)}
    assert named == {*fields.RERANK_HONOURED, *fields.RERANK_ADVISORY, *fields.RERANK_REFUSED}
