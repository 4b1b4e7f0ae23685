"""A request's thinking budget (GenerateRequest.thinking_budget) as an mlx-lm logits processor: once
the model has written that many tokens inside its think block, the next tokens are forced to be
the model's own end-of-think marker (the tokenizer's think_end tokens, as mlx-lm's TokenizerWrapper
knows them), and the model then goes on to answer as it would after closing the block itself.

The state moves only with the tokens it is shown, never with a call: a call repeated at the same
position (generate_step computes one step ahead, so a request moved from it into the batch is
called again there, after rebase()) decides the same. That is what lets a request with a budget
run alone on generate_step and move into the batch like any other."""

from __future__ import annotations

from typing import Any


class ThinkBudget:
    """`processor(tokens, logits) -> logits`, for one request; never reuse it."""

    solo_safe = True  # may run on generate_step: a move into the batch calls rebase()

    def __init__(self, start: tuple[int, ...], end: tuple[int, ...], budget: int, thinking: bool,
                 tool_start: tuple[int, ...] = ()) -> None:
        """`thinking`: the prompt left a think block open (the first token is already thinking).
        `tool_start`: a tool call's opening marker, which leaves the think block as the answer's
        shaping reads it (worker.shaping: reasoning -> tool -> normal), never to be cut into."""
        self._start, self._end, self._tool = list(start), list(end), list(tool_start)
        self._budget = budget
        self.thinking = thinking
        self.spent = 0  # tokens written inside think blocks (markers included)
        self._closing = 0  # how many of the end marker's tokens are written, once forcing began
        self._forcing = False
        self._recent: list[int] = []  # the last tokens, as long as the longer marker
        self._context_len: int | None = None
        if thinking:
            self._begin_forcing_if_spent()  # a budget of 0: the first token closes the block

    def rebase(self) -> None:
        """The next call's context is a new one whose tokens this processor has consumed already."""
        self._context_len = None

    def __call__(self, tokens: Any, logits: Any) -> Any:
        import mlx.core as mx

        if self._context_len is None:
            self._context_len = tokens.size
        elif tokens.size > self._context_len:
            for token in tokens[self._context_len:].tolist():
                self._consume(int(token))
            self._context_len = tokens.size
        forced = self.forced()
        if forced is None:
            return logits
        # All the mass on it, whatever came before (a processor before may have masked it too).
        only = mx.where(mx.arange(logits.shape[-1]) == forced, 0.0, -mx.inf).astype(logits.dtype)
        return mx.broadcast_to(only, logits.shape)

    def forced(self) -> int | None:
        """The token the next step must be (None: the model's own choice)."""
        if not self._forcing:
            return None
        return self._end[self._closing]

    def _consume(self, token: int) -> None:
        self._recent = (self._recent + [token])[-max(len(self._start), len(self._end), len(self._tool)):]
        if not self.thinking:
            if self._ends_with(self._start):
                self.thinking = True
                self._begin_forcing_if_spent()
            return
        self.spent += 1
        if self._forcing:
            self._closing = self._closing + 1 if token == self._end[self._closing] else 0
            if self._closing == len(self._end):
                self._close()
            return
        if self._ends_with(self._end) or self._ends_with(self._tool):  # the model left the block itself
            self._close()
            return
        self._begin_forcing_if_spent()

    def _begin_forcing_if_spent(self) -> None:
        if self.spent < self._budget:
            return
        self._forcing = True
        # The end marker's first tokens may be written already (a multi-token marker under way).
        self._closing = next((n for n in range(len(self._end) - 1, 0, -1)
                              if self._recent[-n:] == self._end[:n]), 0)

    def _close(self) -> None:
        self.thinking = self._forcing = False
        self._closing = 0

    def _ends_with(self, marker: list[int]) -> bool:
        return bool(marker) and self._recent[-len(marker):] == marker


def make(tokenizer: Any, budget: int | None, thinking: bool, tools: bool = False) -> ThinkBudget | None:
    """The request's budget processor; None when it has no budget or the model no think markers.
    `tools`: the request's tool calls are parsed (their marker leaves the think block)."""
    if budget is None or not tokenizer.has_thinking or not tokenizer.think_end_tokens:
        return None
    tool_start = tuple(tokenizer.tool_call_start_tokens or ()) if tools else ()
    return ThinkBudget(tuple(tokenizer.think_start_tokens), tuple(tokenizer.think_end_tokens), budget, thinking,
                       tool_start)
