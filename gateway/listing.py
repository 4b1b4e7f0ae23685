"""`GET /v1/models` and `GET /v1/models/{id}`: the READY models, in OpenAI's shape, or in
Anthropic's when the request carries `anthropic-version` (the anthropic SDK's models.list and
models.retrieve, which Claude Code and Claude Desktop call). A model that is not READY is not
listed: it would not answer. Retrieving one that exists but is not READY is a 404 naming its
state; one that is unknown is a 404 too, in the dialect's error shape."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from protocol import errors as E
from protocol.states import ModelState


def _ready(status: dict) -> list[dict]:
    return [m for m in status["models"] if m["state"] == ModelState.READY.value]


def _created(m: dict, now: float) -> int:
    return int(now - (m.get("ready_for_s") or 0.0))  # when it became routable


def openai_model(m: dict, now: float) -> dict[str, Any]:
    return {"id": m["id"], "object": "model", "created": _created(m, now), "owned_by": "lmx-supervisor",
            "state": m["state"], "revision": m["revision"]}


def anthropic_model(m: dict, now: float) -> dict[str, Any]:
    when = datetime.fromtimestamp(_created(m, now), tz=timezone.utc).isoformat().replace("+00:00", "Z")
    return {"type": "model", "id": m["id"], "display_name": m["id"], "created_at": when}


def listing(status: dict, anthropic: bool) -> dict[str, Any]:
    now = time.time()
    ready = _ready(status)
    if not anthropic:
        return {"object": "list", "data": [openai_model(m, now) for m in ready]}
    data = [anthropic_model(m, now) for m in ready]
    return {"data": data, "has_more": False, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


def one(status: dict, model_id: str, anthropic: bool) -> dict[str, Any]:
    for m in status["models"]:
        if m["id"] != model_id:
            continue
        if m["state"] != ModelState.READY.value:
            raise E.UnknownModel(f"model {model_id!r} is {m['state']}, not READY", model=model_id)
        return (anthropic_model if anthropic else openai_model)(m, time.time())
    raise E.UnknownModel(f"no model {model_id[:128]!r} in this supervisor's config", model=model_id[:128])
