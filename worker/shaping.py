"""What a model's text is, as its markers say: thinking (between think_start and think_end), tool
calls (between tool_call_start and tool_call_end, parsed by the model's own mlx-lm tool parser), or
the answer. Built on mlx-lm's TextStateMachine, which matches the markers in decoded text (robust
to how they were tokenized) and holds back what may still be the start of one, so marker text never
reaches the answer."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from worker.log import log


def transitions(tokenizer: Any, tools: bool) -> dict | None:
    """The state machine's edges for this model: thinking when its vocab has think markers, tool
    calls when the request brought tools and the template has a call format. None: plain text."""
    edges: dict[str, list] = {}
    if tokenizer.has_thinking:
        edges["normal"] = [(tokenizer.think_start, "reasoning")]
        edges["reasoning"] = [(tokenizer.think_end, "normal")]
    if tools and tokenizer.has_tool_calling:
        edges.setdefault("normal", []).append((tokenizer.tool_call_start, "tool"))
        if tokenizer.has_thinking:
            edges["reasoning"].append((tokenizer.tool_call_start, "tool"))
        edges["tool"] = [(tokenizer.tool_call_end, "normal")] if tokenizer.tool_call_end else []
    return edges or None


def initial_state(tokenizer: Any, prompt: list[int]) -> str:
    """A prompt that opened a think block the model must close (templates that start the answer
    with <think>) puts the answer in reasoning from its first token."""
    if tokenizer.has_thinking and tokenizer.rfind_think_start(prompt) > tokenizer.rfind_think_end(prompt):
        return "reasoning"
    return "normal"


class Shaper:
    def __init__(self, machine: Any, initial: str, parser: Any, tools: list[dict] | None, end: str = "") -> None:
        from mlx_lm.generate import TextStateMachine

        self._sm = TextStateMachine
        self._state = machine.make_state(initial)
        self._prev = initial
        self._parser = parser
        self._tools = tools
        self._end = end or ""  # the call's end marker: a cut may leave its first characters
        self._tool_text = ""
        self.reasoning = ""
        self.tool_calls: list[dict] = []
        self._reasoning_sent = 0
        self._calls_sent = 0

    def feed(self, piece: str, finish_reason: str | None) -> str:
        """The answer's text in `piece`; thinking and tool calls are kept apart."""
        sm = self._sm
        if finish_reason == "stop":  # EOS: a marker still half-read is dropped, never shown
            self._state, name = sm.discard(self._state)
            segments = [(name, "")]
        else:
            self._state, segments = sm.split(self._state, piece)
            if finish_reason is not None:
                self._state, flushed, name = sm.flush(self._state)
                segments.append((name, flushed))
        answer = []
        for name, text in segments:
            if name == "reasoning":
                self.reasoning += text
            elif name == "tool":
                self._tool_text += text
            elif name == "normal":
                if self._prev == "tool":
                    self._end_call()
                answer.append(text)
            self._prev = name
        if finish_reason is not None and self._prev == "tool" and self._tool_text:
            # Cut short inside the call: parse what there is; max_tokens' cut is the partial call.
            self._end_call(partial=finish_reason == "length")
        return "".join(answer)

    def _end_call(self, partial: bool = False) -> None:
        text, self._tool_text = self._tool_text, ""
        if partial:
            text = text[:len(text) - next((n for n in range(len(self._end) - 1, 0, -1)
                                           if text.endswith(self._end[:n])), 0)]
        try:
            parsed = self._parser(text, self._tools)
        except Exception as exc:  # mlx-lm's parsers raise what their format does (JSON, regex)
            if partial:
                name, args = partial_call(text, self._parser.__module__.rsplit(".", 1)[-1])
                self.tool_calls.append(_call(None, name, args))
                return
            log("worker.tool_call_unparsable", level="warning", error=repr(exc), chars=len(text))
            return
        for call in parsed if isinstance(parsed, list) else [parsed]:
            args = call.get("arguments", {})
            self.tool_calls.append(_call(call.get("id"), call.get("name", ""),
                                         args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)))

    def take(self) -> dict:
        """Thinking and finished calls since the last take (a chunk's extras)."""
        out: dict = {}
        if len(self.reasoning) > self._reasoning_sent:
            out["reasoning"] = self.reasoning[self._reasoning_sent:]
            self._reasoning_sent = len(self.reasoning)
        if len(self.tool_calls) > self._calls_sent:
            out["tool_calls"] = self.tool_calls[self._calls_sent:]
            self._calls_sent = len(self.tool_calls)
        return out


def _call(call_id: str | None, name: str, arguments: str) -> dict:
    """A call in OpenAI's shape."""
    return {"id": call_id or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


_JSON_NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_JSON_ARGS = re.compile(r'"(?:arguments|parameters)"\s*:\s*(.*)\Z', re.DOTALL)
_KIMI = re.compile(r"(?:functions\.)?([\w.\-]+?)(?::\d+)?\s*<\|tool_call_argument_begin\|>(.*)\Z", re.DOTALL)
_MISTRAL = re.compile(r"\s*([\w-]+)\[ARGS\](.*)\Z", re.DOTALL)


def partial_call(text: str, fmt: str) -> tuple[str, str]:
    """(the name, if it was written whole, else ""; the argument text written so far) of a call cut
    short, in the model's own format (the mlx_lm.tool_parsers module's name)."""
    for pattern in {"kimi_k2": (_KIMI,), "mistral": (_MISTRAL,)}.get(fmt, ()):
        found = pattern.search(text)
        if found:
            return found.group(1), found.group(2)
    name = _JSON_NAME.search(text)
    args = _JSON_ARGS.search(text)
    if name is None and args is None:
        return "", "" if fmt in ("json_tools", "kimi_k2", "mistral") else text.strip()
    return (json.loads(f'"{name.group(1)}"') if name else ""), (args.group(1) if args else "")
