"""Tests for the snapshot test helpers and the GGUF importer."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.harness import REPO
from tests.snapshots import smollm2_gguf_path, write_safetensors, write_tiny_llama

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _write_metadata_only_gguf(path: Path, architecture: str) -> Path:
    """A valid GGUF v3 file with no tensors and one string key: enough to test refusals."""

    def string(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    gguf_string_type = 8
    body = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
    body += string("general.architecture") + struct.pack("<I", gguf_string_type) + string(architecture)
    path.write_bytes(body)
    return path


def _leftover_temp_dirs(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if ".tmp-" in p.name]


@pytest.mark.timeout(60)
def test_tiny_llama_is_fast_and_generates(tmp_path):
    write_tiny_llama(tmp_path / "warm")  # pays the once-per-process tokenizer training
    start = time.perf_counter()
    dest = write_tiny_llama(tmp_path / "tiny", seed=1)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.2, f"write_tiny_llama took {elapsed:.3f}s"

    from mlx_lm import load, stream_generate

    model, tokenizer = load(str(dest))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=8))
    assert 1 <= len(responses) <= 8
    assert responses[-1].finish_reason in ("length", "stop")
    assert tokenizer.decode(tokenizer.encode("Hello, world! café")) == "Hello, world! café"


@pytest.mark.timeout(30)
def test_tiny_llama_is_deterministic_and_takes_model_type(tmp_path):
    a = write_tiny_llama(tmp_path / "a", seed=3)
    b = write_tiny_llama(tmp_path / "b", seed=3)
    c = write_tiny_llama(tmp_path / "c", seed=4, model_type="not-a-model")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert json.loads((c / "config.json").read_text())["model_type"] == "not-a-model"


@pytest.mark.timeout(30)
def test_write_safetensors_header_layout(tmp_path):
    tensors = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.array([1, 2, 3], dtype=np.uint8),
        "c": np.array([1.5, -2.0], dtype=np.float16),
    }
    path = tmp_path / "t.safetensors"
    write_safetensors(path, tensors, {"format": "mlx"})
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    assert (8 + header_len) % 8 == 0
    header = json.loads(raw[8 : 8 + header_len])
    assert header.pop("__metadata__") == {"format": "mlx"}
    assert header["a"] == {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    assert header["b"] == {"dtype": "U8", "shape": [3], "data_offsets": [24, 27]}
    assert header["c"] == {"dtype": "F16", "shape": [2], "data_offsets": [27, 31]}
    data = raw[8 + header_len :]
    assert len(data) == 31
    for name, array in tensors.items():
        start, end = header[name]["data_offsets"]
        got = np.frombuffer(data[start:end], dtype=array.dtype.newbyteorder("<")).reshape(array.shape)
        np.testing.assert_array_equal(got, array)


@pytest.mark.timeout(180)
def test_import_gguf_smollm2_answers_paris(tmp_path, capsys):
    from worker.gguf import main

    dest = tmp_path / "smollm2"
    assert main([str(smollm2_gguf_path()), str(dest), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["model_type"] == "llama" and summary["vocab_size"] == 49152
    assert summary["quantization"] == {"group_size": 32, "bits": 4}
    assert _leftover_temp_dirs(tmp_path) == []
    config = json.loads((dest / "config.json").read_text())
    assert config["rope_traditional"] is True and config["tie_word_embeddings"] is True

    from mlx_lm import load, stream_generate

    model, tokenizer = load(str(dest))
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=16))
    text = "".join(r.text for r in responses)
    assert "Paris" in text, text
    # Stopping short of 16 tokens at <|im_end|> shows the eos wiring works.
    assert responses[-1].finish_reason == "stop"
    assert responses[-1].token == tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
    assert tokenizer.decode(tokenizer.encode("Hello, world! café")) == "Hello, world! café"


@pytest.mark.timeout(30)
def test_import_gguf_refuses_bad_sources(tmp_path):
    from worker.gguf import GgufImportError, import_gguf

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    gpt2 = _write_metadata_only_gguf(tmp_path / "gpt2.gguf", "gpt2")
    cases = {
        tmp_path / "missing.gguf": "cannot read",
        junk: "not a GGUF file",
        gpt2: "architecture 'gpt2' is not supported",
    }
    for source, message in cases.items():
        with pytest.raises(GgufImportError, match=message) as info:
            import_gguf(source, tmp_path / "out")
        assert str(source) in str(info.value)
    assert not (tmp_path / "out").exists()
    assert _leftover_temp_dirs(tmp_path) == []


@pytest.mark.timeout(30)
def test_import_gguf_refuses_non_empty_dest_and_cleans_up_on_failure(tmp_path):
    from worker.gguf import GgufImportError, import_gguf

    dest = tmp_path / "taken"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(GgufImportError, match="already exists"):
        import_gguf(smollm2_gguf_path(), dest)
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]

    def interrupt(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        import_gguf(smollm2_gguf_path(), tmp_path / "fresh", progress=interrupt)
    assert not (tmp_path / "fresh").exists()
    assert _leftover_temp_dirs(tmp_path) == []


def _lmxctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmxctl", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=150)


@pytest.mark.timeout(180)
def test_lmxctl_import_gguf_runs_the_worker_entry_and_keeps_its_output(tmp_path):
    # lmxctl never imports mlx (tests/test_imports.py); the import runs in `python -m worker.gguf`,
    # and what the operator sees and the exit status are what lmxctl printed when it ran in-process.
    dest = tmp_path / "smollm2"
    ok = _lmxctl("import-gguf", str(smollm2_gguf_path()), str(dest))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == f"wrote {dest}\n"
    weights = [line for line in ok.stderr.splitlines() if line.startswith("  weights: ")]
    assert weights[0].endswith("(0%)") and weights[-1].endswith("(100%)"), ok.stderr
    assert (dest / "config.json").exists() and _leftover_temp_dirs(tmp_path) == []

    again = _lmxctl("import-gguf", str(smollm2_gguf_path()), str(dest), "--json")
    assert again.returncode == 1
    error = json.loads(again.stdout)["error"]
    assert error["code"] == "IMPORT_FAILED" and "already exists" in error["message"]
    assert again.stderr == ""  # --json: no progress lines either

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    bad = _lmxctl("import-gguf", str(junk), str(tmp_path / "out"))
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.startswith(f"import-gguf: {junk}: not a GGUF file"), bad.stderr
