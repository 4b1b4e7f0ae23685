"""When a stream's tokens go on the wire. Every message costs the same few thread wake-ups in the
worker, the supervisor and the client whatever it carries, so a model faster than a few hundred
tokens/s spends more CPU moving tokens than it saves by sending them one at a time. A stream's
first chunk goes at once (time to first token); later ones wait for the next step's while that
step is expected to end within `interval_s` of the last send. A step that takes longer (a prefill
slice joining the batch, a slow model) never holds a chunk back: it goes at the end of this one."""

from __future__ import annotations


class Pacer:
    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.sent_at = float("-inf")

    def hold(self, now: float, step_s: float) -> bool:
        """At a step's end: may what is pending wait for the next step?"""
        return now + step_s < self.sent_at + self.interval_s

    def sent(self, now: float) -> None:
        self.sent_at = now
