"""`lmxctl probe PATH`: admit, load and canary a snapshot in a throwaway worker, record the outcome in
the registry, stop the worker. The first failure is the verdict (no restarts)."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Any

from protocol import errors as E
from supervisor import config as cfg_mod, logs
from supervisor import confinement, kinds
from supervisor.admission.evidence import Evidence
from supervisor.lifecycle import modelstatus
from supervisor.lifecycle.runtime import ModelRuntime
from supervisor.operations.gate import AdminGate
from supervisor.operations.settle import settled
from supervisor.services import Services


def probe_model(path: str, roots: tuple[str, ...]) -> cfg_mod.ModelConfig:
    """The throwaway model for `path`; BadRequest when the path is not one we may read."""
    try:  # a path from a request: inside model_roots (when set), no FIFO or device in it
        resolved = confinement.check_path(path, roots)
        confinement.check_tree(resolved, roots)
    except confinement.Refused as exc:
        raise E.BadRequest(f"probe {exc}", path=path[:4096]) from None
    # Named after the directory (the registry's model column), unique by the path's hash.
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(resolved).name)[:40]
    table: dict[str, Any] = {}  # the kind as the snapshot says (an embed one: no prefix cache)
    kind = kinds.resolve("probe", table, resolved)
    return cfg_mod.ModelConfig(id=f"probe-{name}-{hashlib.sha256(resolved.encode()).hexdigest()[:6]}",
                               path=resolved, autoload=False, kind=kind, **table)


async def probe(path: str, services: Services, gate: AdminGate) -> dict[str, Any]:
    """The probe's verdict: the state it reached, its error and canary, and the registry's rows."""
    config, store = services.config, services.store
    model = probe_model(path, config.supervisor.model_roots)
    # Under its own lock: a drain that begins meanwhile waits for the throwaway worker to stop,
    # which no shutdown would otherwise know of.
    async with gate.hold(model.id):
        config = dataclasses.replace(config, restart=dataclasses.replace(config.restart, quarantine_after=1))
        # Each probe is a fresh attempt: an earlier probe's verdict lives in the registry, not here.
        store.set_quarantine(model.id, None)
        store.clear_failures(model.id)
        # Its own services: no eviction for a throwaway worker, one failure is the verdict.
        rt = ModelRuntime(model, services.throwaway(config=config, evict=None))
        rt.start("probe", force=True)
        try:
            await settled(rt, gate.drained)
            outcome = modelstatus.of(rt)
        finally:  # whatever happened, the throwaway worker is not left behind
            await rt.stop("probe done", remember=False)
    err = outcome.last_error
    rows = Evidence(store, model.id, model.path, None).row()
    log = logs.get()
    log.info("model.probed", path=model.path, state=outcome.state, code=err and err["code"])
    return {"path": model.path, "state": outcome.state, "last_error": err, "canary": outcome.canary,
            "registry": rows}
