"""/readyz as a pure function of the supervisor's status: ready only when every model that should
run is READY (routable), not merely loaded."""

from __future__ import annotations

from typing import Any, Sequence

from protocol.states import ModelState as S
from protocol.states import is_state


def _should_run(model: dict[str, Any]) -> bool:
    # Status carries no autoload/wanted flags yet (see docs/gateway.md). Use them once it does;
    # until then: the supervisor moves an autoload model out of UNLOADED in the same loop step
    # that binds its control socket, so UNLOADED means "not wanted" (autoload = false, or an
    # operator's unload). Safe mode, which starts nothing, is handled by the caller.
    if "wanted" in model and model["wanted"] is not None:
        return bool(model["wanted"])
    if "autoload" in model:
        return bool(model["autoload"])
    return not is_state(model["state"], S.UNLOADED)


def check(status: dict[str, Any], required: Sequence[str] = ()) -> tuple[bool, dict[str, Any]]:
    """(ready, report). `required`, when given, names exactly the models that must be READY."""
    sup = status["supervisor"]
    models = {m["id"]: m for m in status["models"]}
    reasons = []
    if sup.get("draining"):
        reasons.append("the supervisor is draining")
    if sup.get("safe_mode"):
        reasons.append("the supervisor is in safe mode and starts no model by itself")
    wanted = list(required) if required else [mid for mid, m in models.items() if _should_run(m)]
    for mid in wanted:
        m = models.get(mid)
        if m is None:
            reasons.append(f"model {mid} is not declared")
        elif not is_state(m["state"], S.READY):
            err = m.get("last_error")
            reasons.append(f"model {mid} is {m['state']}" + (f" ({err['code']})" if err else ""))
    report = {"ready": not reasons, "reasons": reasons, "required": wanted,
              "models": {mid: m["state"] for mid, m in models.items()}}
    return not reasons, report
