"""The real model: SmolLM2-135M-Instruct imported from its GGUF, served through the supervisor."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.harness import REPO

PARIS_CANARY = {"prompt": "What is the capital of France?", "expect": "Paris", "max_tokens": 16,
                "timeout_s": 120.0}


def test_smollm2_passes_its_canary_and_answers_paris_through_lmxctl(make_supervisor, smollm2_model: Path) -> None:
    sup = make_supervisor([{"id": "smollm2", "path": str(smollm2_model), "canary": PARIS_CANARY},
                           {"id": "plain", "path": str(smollm2_model), "canary": PARIS_CANARY,
                            "prefix_cache_bytes": 0}])
    sup.start(timeout_s=180)
    canary = sup.events("model.canary_passed")[0]
    assert "Paris" in canary["text"]
    out = subprocess.run(
        [sys.executable, "-m", "lmxctl", "--state-dir", str(sup.state_dir), "generate", "smollm2",
         "What is the capital of France?", "--chat", "--max-tokens", "16", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert "Paris" in body["text"]
    assert body["finish_reason"] == "stop"  # it ends its answer with <|im_end|>
    assert body["usage"]["completion_tokens"] >= 5

    # The next turn of that conversation starts from the first turn's KV: the same greedy answer
    # as a full prefill (the model beside it has no prefix cache), with the first turn's tokens cached.
    turn2 = [{"role": "user", "content": "What is the capital of France?"},
             {"role": "assistant", "content": body["text"]},
             {"role": "user", "content": "And of Italy?"}]
    hit = sup.client.complete("smollm2", messages=turn2, max_tokens=8)
    ref = sup.client.complete("plain", messages=turn2, max_tokens=8)
    assert hit.text == ref.text
    assert hit.usage["cached_tokens"] >= body["usage"]["prompt_tokens"]
    assert ref.usage["cached_tokens"] == 0
