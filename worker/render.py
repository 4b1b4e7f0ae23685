"""A chat template's rendering, bounded in time and in output length.

The template is the model's own (a client's is never taken: protocol.limits.TEMPLATE_VARIABLES),
but its cost is the input's: a template that walks the messages inside a walk of the messages is
quadratic in a 4096-message request, and Jinja's sandbox bounds neither loops nor output. It runs
in the worker's main thread, between batch steps, so an unbounded render would wedge every request
on the worker while its heartbeats said it was fine.

So a render runs under the PREFILL phase (the liveness watch's prefill_stall_s is its last resort),
and a watchdog thread stops it past RENDER_TIMEOUT_S: `_thread.interrupt_main` makes the main
thread run our SIGALRM handler at its next bytecode (no OS signal is sent, so no other thread's
system call is interrupted), and the handler raises RenderStopped inside the render. It raises
again every RETRY_S until the render has returned, so a library that swallows one exception does
not keep the render going. The rendered text is then bounded before the tokenizer sees it.

In a group only rank 0 renders, and the others take its tokens (worker.group): a bound that
fired on one rank and not another would part the ranks."""

from __future__ import annotations

import _thread
import signal
import threading
import time
from typing import Any, Callable

from protocol.phase import Phase
from worker.log import log

# Far under prefill_stall_s and decode_stall_s (120 s, 60 s by default): a render this long fails
# its request, never the worker. Other streams on the worker wait while it renders.
RENDER_TIMEOUT_S = 10.0
RETRY_S = 0.1
# A rendered prompt is the messages' text (protocol.limits.MAX_PROMPT_CHARS, 2 M) with the
# template's scaffolding per message and the tools' schemas; past this it is not a prompt.
MAX_RENDER_CHARS = 8_000_000


class RenderStopped(Exception):
    """This request's rendering went past a bound: the request fails (BAD_REQUEST), the worker serves on."""


class _Watch:
    """One daemon thread for the process: `running(limit)` arms it around one render."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._deadline: float | None = None
        signal.signal(signal.SIGALRM, self._on_alarm)  # the main thread's: the only caller
        threading.Thread(target=self._run, name="render-watch", daemon=True).start()

    def _on_alarm(self, signum: int, frame: Any) -> None:
        if self._deadline is not None and time.monotonic() >= self._deadline:
            raise RenderStopped("the chat template did not finish rendering")

    def _run(self) -> None:
        with self._cond:
            while True:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                _thread.interrupt_main(signal.SIGALRM)
                self._cond.wait(RETRY_S)

    def arm(self, limit_s: float) -> None:
        with self._cond:
            self._deadline = time.monotonic() + limit_s
            self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._deadline = None


_watch: _Watch | None = None


def bounded(render: Callable[[], str], progress: Any = None, limit_s: float | None = None) -> str:
    """render() under the time bound (in the main thread; elsewhere only the length bound holds)
    and the PREFILL phase; RenderStopped past either bound."""
    global _watch
    limit_s = RENDER_TIMEOUT_S if limit_s is None else limit_s
    main = threading.current_thread() is threading.main_thread()
    if main and _watch is None:
        _watch = _Watch()
    before = getattr(progress, "phase", None)
    if progress is not None:
        progress.phase = Phase.PREFILL
    start = time.monotonic()
    try:
        if main:
            assert _watch is not None
            _watch.arm(limit_s)
        try:
            text = render()
        finally:
            if main:
                _watch.disarm()
    except RenderStopped:
        log("worker.template_render_stopped", level="warning", reason="time", limit_s=limit_s)
        raise RenderStopped(f"the chat template took more than {limit_s:g} s to render this request") from None
    finally:
        if progress is not None:
            progress.phase = before
    if not isinstance(text, str):
        raise RenderStopped(f"the chat template rendered {type(text).__name__}, not text")
    if len(text) > MAX_RENDER_CHARS:
        log("worker.template_render_stopped", level="warning", reason="length", chars=len(text))
        raise RenderStopped(f"the chat template rendered {len(text)} characters for this request, "
                            f"more than {MAX_RENDER_CHARS} (in {time.monotonic() - start:.1f} s)")
    return text
