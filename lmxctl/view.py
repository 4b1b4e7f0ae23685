"""What `lmxctl` shows a person: the status table (fits 100 columns), colour on a terminal only,
byte and duration formats, and for every error code the next step to take."""

from __future__ import annotations

import os
import sys
import textwrap
from typing import Any, TextIO

from protocol.states import ModelState as S
from protocol.states import is_state

WIDTH = 100
_COLOURS = {"red": "31", "green": "32", "yellow": "33", "blue": "34", "magenta": "35", "dim": "2", "bold": "1"}
_COLOUR_OF = {
    S.READY: "green", S.QUARANTINED: "red", S.REJECTED: "red", S.BACKOFF: "yellow", S.ROLLING_BACK: "yellow",
    S.ADMITTING: "blue", S.STARTING: "blue", S.LOADING: "blue", S.CANARY: "blue", S.DRAINING: "magenta",
    S.UNLOADED: "dim",
}
# Keyed by the status's state string: a state this lmxctl does not know is shown uncoloured.
STATE_COLOUR = {s.value: colour for s, colour in _COLOUR_OF.items()}

# For each code: what to do next. {model} is filled in; these are commands the runbook documents.
NEXT_STEP = {
    "BAD_REQUEST": "check the command's arguments (lmxctl COMMAND --help)",
    "UNAUTHORIZED": "use a client key with the admin role, or run lmxctl as the supervisor's owner",
    "UNKNOWN_MODEL": "lmxctl status lists the configured models; add the model to the config, then lmxctl reload",
    "SNAPSHOT_NOT_FOUND": "fix the model's path in the config, then lmxctl reload",
    "SNAPSHOT_INCOMPLETE": "lmxctl verify {model} lists every finding; lmxctl repair {model} fetches the files",
    "SNAPSHOT_CORRUPT": "lmxctl verify {model} lists every finding; lmxctl repair {model} fetches the files",
    "CONFIG_INVALID": "fix the snapshot's config.json (lmxctl verify {model}), or lmxctl repair {model}",
    "UNSUPPORTED_ARCHITECTURE": "upgrade mlx-lm to a version that implements this model_type, or remove the model",
    "COMPAT_KNOWN_BAD": "lmxctl compat shows the evidence; after upgrading mlx/mlx-lm: lmxctl load {model} --force",
    "INSUFFICIENT_MEMORY": "unload another model (lmxctl unload MODEL), raise memory_budget_bytes, "
                           "or set evict = \"lru\"",
    "LOAD_FAILED": "lmxctl history {model} and lmxctl logs --model {model} show why; the supervisor retries",
    "LOAD_TIMEOUT": "the weights load slowly: raise load_timeout_s, or check the disk (lmxctl logs --model {model})",
    "CANARY_FAILED": "lmxctl logs --model {model} shows the canary's output; check the weights (lmxctl verify {model})",
    "CANARY_TIMEOUT": "raise the canary's timeout_s or lower its max_tokens; lmxctl logs --model {model}",
    "MODEL_NOT_READY": "wait: lmxctl load {model} follows it to READY",
    "MODEL_QUARANTINED": "lmxctl history {model} shows the failures; after fixing the cause: lmxctl release {model} "
                         "(or lmxctl rollback {model})",
    "WORKER_CRASHED": "lmxctl history {model} has the crash record; the supervisor restarts the model",
    "WORKER_OOM": "raise the model's memory_limit_bytes or lower context_tokens; lmxctl history {model}",
    "WORKER_HUNG": "lmxctl history {model}; raise decode_stall_s / prefill_stall_s if the model is just slow",
    "PEER_UNAVAILABLE": "lmxctl history {model} names the host; check that its supervisor runs and the link (docs/distributed.md)",
    "REQUEST_TIMEOUT": "raise the request's timeout, or lower max_tokens",
    "CANCELLED": "the request was cancelled; nothing to do",
    "OVERLOADED": "retry after retry_after_s; the model's queue is full",
    "SHUTTING_DOWN": "the supervisor is stopping; retry once it is back (lmxctl status)",
    "INTERNAL": "a bug: lmxctl logs --level error has the traceback; please report it",
    "SUPERVISOR_UNAVAILABLE": "start the daemon (lmxctl service status), or pass --state-dir / set LMX_STATE_DIR",
}


def use_colour(stream: TextIO = sys.stdout) -> bool:
    return stream.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def paint(text: str, colour: str | None, on: bool) -> str:
    if not on or not colour:
        return text
    return f"\033[{_COLOURS[colour]}m{text}\033[0m"


def human_bytes(n: int | float | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return "-"


def human_duration(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def next_step(code: str, model: str | None = None) -> str | None:
    hint = NEXT_STEP.get(code)
    return hint.format(model=model or "MODEL") if hint else None


def status_table(status: dict[str, Any], colour: bool = False) -> str:
    sup = status["supervisor"]
    head = (f"supervisor pid {sup['pid']}  v{sup['version']}  up {human_duration(sup['uptime_s'])}  "
            f"rss {human_bytes(sup['rss_bytes'])}  memory {human_bytes(sup['memory_reserved_bytes'])}"
            f"/{human_bytes(sup['memory_budget_bytes'])}")
    lines = [head]
    if sup.get("safe_mode"):
        lines.append(paint("SAFE MODE: crash loop detected, no model starts by itself; lmxctl load MODEL",
                           "red", colour))
    if sup.get("draining"):
        lines.append(paint("draining: the supervisor is shutting down", "magenta", colour))
    if sup.get("store_degraded"):
        lines.append(paint(f"STORE DEGRADED: {sup.get('store_pending_writes', 0)} writes held in memory and retried "
                           f"({sup.get('store_error') or 'unknown'}); see the runbook", "red", colour))
    if sup.get("memory_stranded_bytes"):
        lines.append(paint(f"memory not returned by dead workers: {human_bytes(sup['memory_stranded_bytes'])} "
                           "(held from the budget until restart)", "yellow", colour))
    cols = (f"{'MODEL':<14} {'KIND':<8} {'STATE':<12} {'REVISION':<12} {'UPTIME':>7} {'RESTARTS':>8} {'FAILS':>5} "
            f"{'MEMORY':>7}  LAST ERROR")
    lines.append(paint(cols, "bold", colour))
    hints = []
    for m in status["models"]:
        err = m.get("last_error")
        memory = (m.get("memory") or {}).get("rss_bytes")
        room = WIDTH - 82
        err_s = f"{err['code']}: {err['message']}" if err else "-"
        if m.get("configured_revision") not in (None, m["revision"]):
            err_s = f"runs {m['revision']}, configured {m['configured_revision']}; {err_s}"
        err_s = err_s if len(err_s) <= room else err_s[: room - 1] + "…"
        state = f"{m['state']:<12}"
        kind = (m.get("kind") or "generate")[:8]  # a supervisor from before kinds served generate alone
        lines.append(f"{m['id'][:14]:<14} {kind:<8} {paint(state, STATE_COLOUR.get(m['state']), colour)} "
                     f"{m['revision']:<12} "
                     f"{human_duration(m.get('ready_for_s')):>7} {m['restarts']:>8} {m['failures_in_window']:>5} "
                     f"{human_bytes(memory):>7}  {err_s}")
        for r in m.get("group") or []:  # a group's ranks, under it
            lines.append(f"  rank {r['rank']:<3} {r['host'][:12]:<12} pid {r['pid'] or '-':<8} {r['state']:<8} "
                         f"{human_bytes((r.get('memory') or {}).get('rss_bytes')):>7}  {r['address']}")
        if err and not is_state(m["state"], S.READY):
            hints.append(paint(f"{m['id']} is {m['state']}: {err['code']}: ", "bold", colour)
                         + textwrap.shorten(err["message"], 400, placeholder=" …"))
            step = next_step(err["code"], m["id"])
            if step:
                hints.append(paint(f"  next: {step}", "yellow", colour))
    if hints:
        lines.append("")
        lines += hints
    return "\n".join(lines)


def rank_of(record: dict[str, Any]) -> str:
    """A crash record's rank and host, for a group's failure ("" for a single worker's)."""
    return f"  rank {record['rank']} on {record.get('host') or '-'}" if record.get("rank") is not None else ""
