"""The embed kind end to end on the real all-MiniLM-L6-v2: the worker's encoder against a numpy
forward written here, and one supervisor serving it beside a tiny generate model (the client's
embed verb, the canary, the refusals by kind and by bounds, a SIGKILL mid-request)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from protocol import errors as E
from protocol import limits
from tests.harness import REPO, RunningSupervisor, kill_mid_request, process_gone
from tests.reference_bert import ReferenceBert
from tests.snapshots import write_minilm, write_tiny_bert

pytestmark = pytest.mark.timeout(120)

SENTENCES = ["A man is playing a guitar.", "A man plays the guitar.", "The quarterly tax report is due on Friday.",
             "Embeddings turn text into vectors."]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_minilm(tmp_path_factory.mktemp("models") / "minilm")


def _reference(path: Path, texts: list[str]) -> np.ndarray:
    """BERT with mean pooling and L2 normalisation in float64 numpy (tests/reference_bert.py): an
    independent computation of what the worker must return."""
    from tokenizers import Tokenizer

    bert = ReferenceBert(path)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.no_padding()  # this tokenizer.json pads to 128; sentence-transformers pools the real tokens only
    out = []
    for text in texts:
        v = bert.encode(tok.encode(text).ids).mean(0)
        out.append(v / np.linalg.norm(v))
    return np.array(out)


def test_the_workers_encoder_matches_an_independent_forward_pass(minilm: Path) -> None:
    from supervisor.admission import architectures
    from worker import embed

    engine = embed.EmbedEngine()
    engine.load(str(minilm))
    got = engine.embed(engine.tokens(SENTENCES))
    want = _reference(minilm, SENTENCES)
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.999, cos
    # Padding in a shared pass changes nothing: one pass of all equals a pass per sentence.
    alone = np.concatenate([engine.embed(engine.tokens([s])) for s in SENTENCES])
    assert np.abs(alone - got).max() < 1e-5
    assert got[0] @ got[1] > got[0] @ got[2]  # paraphrases closer than an unrelated pair
    # The supervisor's registry names what the worker implements, and its version.
    assert architectures.EMBED_TYPES == embed.TYPES
    assert dict([architectures.EMBED_ENGINE]) == {embed.ENGINE[0].replace("_", "-"): embed.ENGINE[1]}


def test_an_embed_engine_never_imports_mlx_lm_or_transformers(minilm: Path) -> None:
    """What an embed worker's start pays for: mlx and the fast tokenizer, not mlx-lm's imports."""
    code = ("import sys; from worker import main, embed; e = embed.EmbedEngine(); e.load(sys.argv[1]); "
            "e.embed(e.tokens(['hi'])); print(sorted(m for m in ('mlx_lm', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(minilm)], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "[]", out.stderr[-2000:]


def test_passes_are_cut_by_padded_tokens() -> None:
    from worker.embed import batches

    lengths = [3, 200, 5, 4, 9]
    parts = batches(lengths, budget=40)
    assert sorted(i for p in parts for i in p) == list(range(5))  # every input, once
    assert all(len(p) * max(lengths[i] for i in p) <= 40 for p in parts if len(p) > 1)
    assert [1] in parts and len(parts) == 2  # the long one alone, the four short ones together


def test_every_id_the_tiny_berts_tokenizer_emits_has_a_row(tmp_path: Path) -> None:
    # MLX does not bound-check a gather: an id past the table reads whatever memory lies beyond it.
    import json

    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    bert = write_tiny_bert(tmp_path / "bert")
    rows = load_file(str(bert / "model.safetensors"))["embeddings.word_embeddings.weight"].shape[0]
    assert rows == json.loads((bert / "config.json").read_text())["vocab_size"]
    ids = json.loads((bert / "tokenizer.json").read_text())["model"]["vocab"].values()
    assert max(ids) < rows
    assert max(Tokenizer.from_file(str(bert / "tokenizer.json")).encode("a writes").ids) < rows


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory, minilm: Path, tiny_model: Path):
    s = RunningSupervisor(tmp_path_factory.mktemp("embed"), [
        {"id": "emb", "path": str(minilm)},  # its kind detected from 1_Pooling/config.json
        {"id": "gen", "path": str(tiny_model), "max_batch_size": 2},
    ]).start(timeout_s=90)
    yield s
    s.stop()


def test_an_embed_worker_answers_through_the_client_after_its_canary(sup: RunningSupervisor, minilm: Path) -> None:
    status = {m["id"]: m for m in sup.status()["models"]}
    assert (status["emb"]["kind"], status["gen"]["kind"]) == ("embed", "generate")
    assert status["emb"]["canary"]["text"].startswith("dims 384 near ")
    passed = [e for e in sup.events("model.canary_passed") if e.get("model") == "emb"]
    assert passed, "the embed model became READY without its canary"
    result = sup.client.embed("emb", SENTENCES)
    assert result.dims == 384 and len(result.vectors) == len(SENTENCES)
    got = np.array(result.vectors)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    want = _reference(minilm, SENTENCES[:2])
    assert ((got[:2] * want).sum(1) >= 0.999).all()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm / "tokenizer.json"))
    tok.no_padding()
    assert result.prompt_tokens == sum(len(tok.encode(s).ids) for s in SENTENCES)
    cut = sup.client.embed("emb", [[101, 7592, 102]], dimensions=64)
    assert cut.dims == 64 and abs(np.linalg.norm(cut.vectors[0]) - 1.0) < 1e-5
    with pytest.raises(E.BadRequest, match="more than the model's 384"):
        sup.client.embed("emb", ["too wide"], dimensions=385)
    with pytest.raises(E.BadRequest, match="past the vocabulary"):
        sup.client.embed("emb", [[10**6]])


def test_requests_of_the_other_kind_are_refused_naming_it(sup: RunningSupervisor) -> None:
    with pytest.raises(E.BadRequest, match="kind 'embed'") as gen_to_embed:
        sup.client.complete("emb", "Hello", max_tokens=2)
    with pytest.raises(E.BadRequest, match="kind 'generate'") as embed_to_gen:
        sup.client.embed("gen", ["hello"])
    with pytest.raises(E.BadRequest, match="kind 'embed'"):
        sup.client.count_tokens("emb", prompt="Hello")
    assert gen_to_embed.value.details["kind"] == "embed" and embed_to_gen.value.details["kind"] == "generate"
    assert sup.model("emb")["restarts"] == 0 and sup.model("gen")["restarts"] == 0


def test_inputs_past_the_bounds_are_refused_before_the_wire(sup: RunningSupervisor) -> None:
    client = sup.client
    for inputs, words in ((["x"] * (limits.MAX_EMBED_INPUTS + 1), "entries"),
                          (["x" * (limits.MAX_EMBED_INPUT_CHARS + 1)], "characters"),
                          ([[1] * (limits.MAX_EMBED_INPUT_TOKENS + 1)], "tokens"),
                          ([], "entries"), (["a", [1]], "expected")):
        with pytest.raises(E.BadRequest, match=words):
            client.embed("emb", inputs)
    with pytest.raises(E.BadRequest, match="dimensions"):
        client.embed("emb", ["x"], dimensions=limits.MAX_EMBED_DIMS + 1)
    # Nothing of those reached the supervisor: it logged no refused request.
    assert not [e for e in sup.events("client.bad_request")]


def test_sigkill_of_the_embed_worker_mid_request_fails_that_request_alone(sup: RunningSupervisor) -> None:
    victim = sup.model("emb")["worker_pid"]
    long_text = " ".join(["supervision keeps every worker honest"] * 60)  # ~250 tokens each
    inputs = [f"{i} {long_text}" for i in range(256)]
    err, beside = kill_mid_request(sup, "emb", lambda c: c.embed("emb", inputs, timeout_s=60), "gen")
    assert isinstance(err, E.WorkerCrashed), err
    assert err.details["signal"] == "SIGKILL"
    assert beside.usage["completion_tokens"] >= 1
    assert sup.model("gen")["restarts"] == 0
    sup.wait_model("emb", lambda m: m["state"] == "READY" and m["worker_pid"] != victim, 60, "emb READY again")
    assert process_gone(victim)
    assert sup.client.embed("emb", ["back again"]).dims == 384
