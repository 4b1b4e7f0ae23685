"""ADMITTING: a model reaches a worker only when its snapshot is complete and intact, mlx-lm
implements its architecture, the registry does not know it as failed here, and it fits in memory.
Checked from headers, names and the store alone, before any worker is spawned, never with mlx."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from protocol import errors as E
from supervisor import confinement
from supervisor.admission import architectures, checksums, kvcache, snapshot
from supervisor.admission.evidence import Evidence
from supervisor.admission.memory import estimate, MemoryLedger
from supervisor.config import ModelConfig
from supervisor.persistence.store import Store

Evict = Callable[[str, int], Awaitable[bool]]


async def integrity(model: ModelConfig, store: Store, roots: tuple[str, ...] = (),
                    fresh: bool = False) -> E.LmxError | None:
    """`roots`: model_roots, checked here too because a revision can come from the store (a
    rollback) rather than from the config that was checked at load. `fresh`: see checksums."""
    try:
        confinement.check_path(model.path, roots)
    except confinement.Refused as exc:
        return E.SnapshotNotFound(f"model path {exc}", file=model.path)
    findings = snapshot.verify(model.path)
    if not findings and model.checksums:
        # Hashing reads whole files: off the event loop, so status and other models never wait.
        findings = await asyncio.to_thread(checksums.verify, store, model.path, fresh)
    if findings:
        exc = findings[0].to_exc(more=len(findings) - 1)
        exc.details["findings"] = [f.to_dict() for f in findings]
        return exc
    model_type = snapshot.model_type(model.path)
    if model_type is None or not architectures.supported(model_type, model.kind):
        name, version = architectures.engine(model.kind)
        details = {"mlx_lm": version} if name == "mlx-lm" else \
            {"engine": name, "engine_version": version, "kind": model.kind}
        return E.UnsupportedArchitecture(
            f"config.json: model_type {model_type!r} is not supported by the installed {name} {version}"
            + ("" if model.kind == "generate" else f" (a model of kind {model.kind})"),
            file="config.json", model_type=model_type, **details)
    return None


def share(model: ModelConfig) -> float:
    """The part of a model this host holds: all of it, or a group's local ranks' share."""
    if model.group is None:
        return 1.0
    return sum(h == "local" for h in model.group.hosts) / model.group.size


async def reserve_memory(model_id: str, model: ModelConfig, evidence: Evidence | None, ledger: MemoryLedger,
                         evict: Evict | None, part: float = 1.0) -> E.LmxError | None:
    """`part`: the share of the weights and KV this host holds (a group's ranks split them)."""
    row = evidence.row() if evidence is not None else None
    peak = (row or {}).get("evidence", {}).get("peak_memory_bytes")
    est = estimate(model.path, model.context_tokens, peak, kvcache.budget_bytes(model), model.kind)
    if part < 1.0:
        est = {k: int(v * part) if isinstance(v, int) else v for k, v in est.items()}
    await ledger.settle()  # a worker that just died must have given its memory back first
    if ledger.try_reserve(model_id, est["total"]):
        return None
    if evict is not None and await evict(model_id, est["total"]) and ledger.try_reserve(model_id, est["total"]):
        return None
    others, budget, stranded = ledger.others(model_id), ledger.budget, ledger.stranded_bytes()
    return E.InsufficientMemory(
        f"needs {est['total']:,} bytes (weights {est['weights']:,} + KV {est['kv_cache']:,} + prefix cache "
        f"{est['prefix_cache']:,} + overhead "
        f"{est['overhead']:,}{', measured peak ' + format(peak, ',') if peak else ''}); "
        f"{others:,} of the {budget:,}-byte budget are held by other models"
        + (f" and by memory dead workers never gave back ({stranded:,})" if stranded else ""),
        estimate=est, held_by_others=others, budget=budget, stranded=stranded)


async def admit(model_id: str, model: ModelConfig, store: Store, ledger: MemoryLedger, evict: Evict | None,
                force: bool, roots: tuple[str, ...] = (), fresh: bool = False) -> E.LmxError | None:
    """None: admitted (and its memory reserved). Else the refusal, naming what is wrong.
    `force` (an operator's word, or a serving worker to adopt) skips only the registry's verdict."""
    refusal = await integrity(model, store, roots, fresh)
    if refusal is not None:
        return refusal
    evidence = Evidence(store, model_id, model.path, model.worker_command, model.group)
    known_bad = None if force else evidence.known_bad()
    return known_bad or await reserve_memory(model_id, model, evidence, ledger, evict, share(model))
