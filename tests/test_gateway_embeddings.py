"""`POST /v1/embeddings` end to end: the openai SDK's embeddings.create against a real lmx-gateway
over a real supervisor serving the real all-MiniLM-L6-v2 (beside a tiny generate model), in both
encodings (the SDK's default is base64, which it decodes itself), a list input, token arrays,
dimensions, the similarity order the model is known for, and bad inputs as OpenAI-shaped 400s.
What the vectors must be is tests/test_embed_worker.py's (against an independent numpy forward
pass); here the gateway must hand on exactly the supervisor's vectors."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import openai
import pytest

from protocol import limits
from tests.snapshots import write_minilm, write_tiny_bert
from tests.test_gateway import supervised_gateway

pytestmark = pytest.mark.timeout(120)

SENTENCES = ["A man is playing a guitar.", "A man plays the guitar.", "The quarterly tax report is due on Friday.",
             "Embeddings turn text into vectors."]
# (anchor, closer, further): the order all-MiniLM-L6-v2 gives these pairs.
ORDER = [("A man is playing a guitar.", "Someone plays a musical instrument.", "The stock market fell sharply today."),
         ("How do I bake bread?", "What is a good recipe for a loaf of bread?", "How do I change a car tyre?"),
         ("The cat sleeps on the sofa.", "A kitten naps on the couch.", "Interest rates rose by half a point.")]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    root = tmp_path_factory.mktemp("gateway-embeddings")
    minilm = write_minilm(root / "minilm")
    tiny = write_tiny_bert(root / "tiny-bert", pooling="cls_token")
    yield from supervised_gateway(root, [{"id": "emb", "path": str(minilm)}, {"id": "tiny-emb", "path": str(tiny)},
                                         {"id": "gen", "path": str(tiny_model)}])


def _vectors(resp: openai.types.CreateEmbeddingResponse) -> np.ndarray:
    assert [d.index for d in resp.data] == list(range(len(resp.data)))
    return np.array([d.embedding for d in resp.data], dtype=np.float32)


def test_float_and_base64_carry_the_supervisors_vectors_exactly(gw) -> None:
    sup, gateway = gw
    client = gateway.openai()
    direct = sup.client.embed("emb", SENTENCES)
    floats = client.embeddings.create(model="emb", input=SENTENCES, encoding_format="float")
    assert floats.object == "list" and floats.model == "emb" and floats.data[0].object == "embedding"
    got = _vectors(floats)
    assert got.shape == (len(SENTENCES), 384)
    assert np.array_equal(got, np.array(direct.vectors, dtype=np.float32))  # float32 survives JSON's doubles
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == direct.prompt_tokens > len(SENTENCES)
    # The SDK's default: it asks for base64 and decodes the float32 bytes itself.
    default = client.embeddings.create(model="emb", input=SENTENCES)
    assert np.array_equal(_vectors(default), got)
    raw = gateway.http.post("/v1/embeddings", json={"model": "emb", "input": SENTENCES[0],
                                                    "encoding_format": "base64", "user": "someone"})
    assert raw.status_code == 200, raw.text
    one = np.frombuffer(base64.b64decode(raw.json()["data"][0]["embedding"]), dtype="<f4")
    assert np.array_equal(one, got[0])


def test_the_models_similarity_order_holds_through_the_gateway(gw) -> None:
    _, gateway = gw
    texts = [t for triple in ORDER for t in triple]
    v = _vectors(gateway.openai().embeddings.create(model="emb", input=texts, encoding_format="float"))
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    for i in range(0, len(texts), 3):
        anchor, closer, further = v[i:i + 3]
        assert anchor @ closer > anchor @ further + 0.1, texts[i:i + 3]


def test_token_arrays_and_dimensions(gw) -> None:
    _, gateway = gw
    client = gateway.openai()
    ids = [101, 7592, 2088, 102]  # [CLS] hello world [SEP] in MiniLM's vocabulary
    arrays = _vectors(client.embeddings.create(model="emb", input=[ids, ids[1:3]], encoding_format="float"))
    flat = _vectors(client.embeddings.create(model="emb", input=ids, encoding_format="float"))
    text = _vectors(client.embeddings.create(model="emb", input="hello world", encoding_format="float"))
    assert np.allclose(arrays[0], flat[0], atol=1e-6) and np.allclose(arrays[1], text[0], atol=1e-5)
    cut = client.embeddings.create(model="emb", input=["hello world", "tax"], dimensions=64)
    short = _vectors(cut)
    assert short.shape == (2, 64) and np.allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-5)
    want = text[0][:64] / np.linalg.norm(text[0][:64])  # the head of the full vector, re-normalised
    assert np.allclose(short[0], want, atol=1e-5)


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"model": "emb"}, "input", "required"),
    ({"model": "emb", "input": []}, "input", "non-empty"),
    ({"model": "emb", "input": ["a", 1]}, "input", "token array"),
    ({"model": "emb", "input": [[1, 2], "b"]}, "input", "token array"),
    ({"model": "emb", "input": "a", "encoding_format": "int8"}, "encoding_format", "float, base64"),
    ({"model": "emb", "input": "a", "dimensions": 0}, "dimensions", "positive"),
    ({"model": "emb", "input": "a", "dimensions": limits.MAX_EMBED_DIMS + 1}, "dimensions", "dimensions"),
    ({"model": "emb", "input": "a", "truncate": "END"}, "truncate", "unknown field"),
    ({"model": "emb", "input": ["x"] * (limits.MAX_EMBED_INPUTS + 1)}, "input", "entries"),
    ({"model": "emb", "input": "x" * (limits.MAX_EMBED_INPUT_CHARS + 1)}, "input", "characters"),
    ({"input": "a"}, "model", "model"),
])
def test_bad_inputs_are_400s_in_openais_shape(gw, body: dict, param: str, words: str) -> None:
    _, gateway = gw
    r = gateway.http.post("/v1/embeddings", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["type"], err["code"], err["param"]) == ("invalid_request_error", "BAD_REQUEST", param), err
    assert words in err["message"]
    assert r.headers["x-should-retry"] == "false"


def test_the_other_kind_and_an_unknown_model_through_the_sdk(gw) -> None:
    sup, gateway = gw
    client = gateway.openai()
    with pytest.raises(openai.BadRequestError, match="kind 'generate'"):
        client.embeddings.create(model="gen", input="hello")
    with pytest.raises(openai.NotFoundError) as missing:
        client.embeddings.create(model="nope", input="hello")
    assert missing.value.body["code"] == "UNKNOWN_MODEL"
    chat = gateway.http.post("/v1/chat/completions", json={"model": "emb", "messages": [{"role": "user",
                                                                                         "content": "hi"}]})
    assert chat.status_code == 400 and "kind 'embed'" in chat.json()["error"]["message"]
    assert sup.model("emb")["restarts"] == 0


def test_a_tiny_random_bert_is_detected_and_served_as_an_embed_model(gw) -> None:
    sup, gateway = gw
    assert sup.model("tiny-emb")["kind"] == "embed"  # from its 1_Pooling/config.json alone
    resp = gateway.openai().embeddings.create(model="tiny-emb", input=["hello world", "the model"])
    v = _vectors(resp)
    assert v.shape == (2, 32) and np.all(np.isfinite(v)) and not np.allclose(v[0], v[1])
    assert resp.usage.prompt_tokens == 2 * 4  # [CLS] w w [SEP] each, in the tiny WordPiece vocabulary


def test_docs_list_every_embeddings_field() -> None:
    import re

    from gateway import fields

    doc = (Path(__file__).resolve().parents[1] / "docs" / "gateway.md").read_text()
    section = doc[doc.index("#### `POST /v1/embeddings`"):]
    section = section[:section.index("\n#### ")]
    named = set(re.findall(r"^\| `([a-z_]+)` \|", section, re.M))
    assert named == {*fields.EMBEDDINGS_HONOURED, *fields.EMBEDDINGS_ADVISORY}
