"""Test-only worker wrapper, named in a model's `worker_command`: the real worker, but every
generation writes the text given with --script (then EOS), whatever the random weights would say;
with --after-tool, a request whose last message is a tool's result writes that text instead, so an
agent loop (call a tool, send its result back, get the final answer) runs on one model.
It goes in where constrained decoding does, as an mlx-lm logits processor, so everything after the
model (detokenizing, think and tool-call markers, tool parsing, stop strings, logprobs) runs as it
does in production."""

from __future__ import annotations

import argparse

parser = argparse.ArgumentParser()
parser.add_argument("--script", required=True, help="the text every generation writes")
parser.add_argument("--after-tool", help="the text written when the last message is a tool result")
args = parser.parse_args()


class Scripted:
    """Puts all the mass on the script's next token; its first call sees the whole prompt. The
    worker's own processors after it (a thinking budget) may force another token: when the script
    has that token further on, it goes on from just after it (a forced `</think>` skips the rest of
    the script's thinking), else from where it was."""

    def __init__(self, ids: list[int], eos: int) -> None:
        self._ids, self._eos = ids, eos
        self._seen: int | None = None
        self._pos = 0

    def __call__(self, tokens, logits):  # type: ignore[no-untyped-def]
        import mlx.core as mx

        if self._seen is None:
            self._seen = int(tokens.size)
        for token in tokens[self._seen:].tolist():
            if self._pos < len(self._ids) and self._ids[self._pos] == token:
                self._pos += 1
            elif token in self._ids[self._pos:]:
                self._pos = self._ids.index(token, self._pos) + 1
        self._seen = max(self._seen, int(tokens.size))
        target = self._ids[self._pos] if self._pos < len(self._ids) else self._eos
        return mx.where(mx.arange(logits.shape[-1]) == target, 0.0, -1e9).astype(logits.dtype)[None]


import worker.batch as batch  # noqa: E402

_ids: dict[str, list[int]] = {}


def _after_tool(req) -> bool:  # type: ignore[no-untyped-def]
    msgs = req.messages or []
    return bool(args.after_tool) and bool(msgs) and msgs[-1].get("role") == "tool"


def _processors(self, req):  # type: ignore[no-untyped-def]
    tok = self._engine.tokenizer
    script = args.after_tool if _after_tool(req) else args.script
    if script not in _ids:
        _ids[script] = tok.encode(script, add_special_tokens=False)
    return [Scripted(_ids[script], next(iter(tok.eos_token_ids)))]


batch.Batcher._processors = _processors

from worker.main import main  # noqa: E402

raise SystemExit(main())
