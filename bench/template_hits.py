"""How much of each turn the prefix cache can serve, as the chat template decides it: a turn's prompt
hits up to the first token where it differs from the previous turn's prompt plus its answer (what
the worker's cache holds). Measured on SmolLM2's own template (ChatML) and on a reasoning-style
template that drops earlier turns' <think> blocks, as Qwen3's and DeepSeek-R1's do. Tokenizers only:
no model runs. Prints one JSON line and a table."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Earlier assistant turns lose their reasoning; the last one (being generated) keeps it.
REASONING_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{% set c = m['content'].split('</think>')[-1].lstrip() %}"
    "{% else %}{% set c = m['content'] %}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + c + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SYSTEM = "You are a helpful assistant for a software team. " * 40
ANSWERS = [
    "<think>The user asks about {q}. Let me recall the facts first and check them.</think>"
    "Here is what I know about {q}: it is well documented, and the short answer is yes."
]
QUESTIONS = ["Paris", "the Seine", "the Louvre", "croissants", "the metro", "the Eiffel tower"]


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def measure(tok, template: str | None, thinking: bool) -> list[dict]:
    messages = [{"role": "system", "content": SYSTEM}]
    held: list[int] | None = None
    rows = []
    for turn, q in enumerate(QUESTIONS, 1):
        messages.append({"role": "user", "content": f"Tell me about {q}."})
        prompt = list(tok.apply_chat_template(messages, add_generation_prompt=True, chat_template=template,
                                              tokenize=True, return_dict=False))
        hit = min(_common(prompt, held), len(prompt) - 1) if held else 0
        rows.append({"turn": turn, "prompt_tokens": len(prompt), "hit_tokens": hit,
                     "hit_rate": round(hit / len(prompt), 4)})
        answer = ANSWERS[0].format(q=q) if thinking else ANSWERS[0].format(q=q).split("</think>")[-1]
        generated = list(tok.encode(answer, add_special_tokens=False)) + [tok.convert_tokens_to_ids("<|im_end|>")]
        held = prompt + generated  # what the worker's cache holds once the turn finished
        messages.append({"role": "assistant", "content": answer})
    return rows


def main() -> int:
    from transformers import AutoTokenizer

    from tests.snapshots import smollm2_gguf_path
    from worker.gguf import import_gguf

    with tempfile.TemporaryDirectory() as tmp:
        dest = Path(tmp) / "smollm2"
        import_gguf(smollm2_gguf_path(), dest)
        tok = AutoTokenizer.from_pretrained(str(dest))
        results = {"smollm2_chatml": measure(tok, None, False),
                   "reasoning_drops_think": measure(tok, REASONING_TEMPLATE, True)}
    summary = {name: round(sum(r["hit_tokens"] for r in rows[1:]) / sum(r["prompt_tokens"] for r in rows[1:]), 4)
               for name, rows in results.items()}
    print(json.dumps({"bench": "template_hits", "hit_rate_turns_2_6": summary, "turns": results}))
    print(f"\n{'template':<24}" + "".join(f"{'turn ' + str(i):>12}" for i in range(1, len(QUESTIONS) + 1)))
    for name, rows in results.items():
        print(f"{name:<24}" + "".join(f"{r['hit_tokens']:>5}/{r['prompt_tokens']:<6}" for r in rows))
    for name, rate in summary.items():
        print(f"{name}: {rate:.1%} of turns 2-{len(QUESTIONS)}'s prompt tokens served from the cache")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
