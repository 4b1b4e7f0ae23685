"""In-process, on FakeWorkers, the lifecycle decisions a real-process test used to pay a supervisor for:
an automatic rollback is admitted like any start (the last-known-good's snapshot checked again)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from protocol import errors as E
from supervisor.lifecycle.states import ModelState as S
from tests.fakeworker import FakeFactory
from tests.lifecycle_rig import inloop, rig
from tests.snapshots import write_tiny_llama

pytestmark = pytest.mark.timeout(30)


@inloop
async def test_a_rollback_to_weights_truncated_since_is_refused_as_corrupt_and_keeps_the_lkg(tmp_path: Path,
                                                                                           tiny_model: Path) -> None:
    # Was test_registry_evidence's real-process test: v1 became last-known-good, its shard was cut
    # in half since, and v2 keeps failing; the rollback to v1 is refused at admission, never spawned.
    v1 = write_tiny_llama(tmp_path / "v1")
    old = rig(tmp_path, v1, restart="quarantine_after = 2\nstable_after_s = 0.01")
    new = rig(tmp_path, tiny_model, FakeFactory(ready=E.LoadTimeout("no ready")), store=old.store,
              restart="quarantine_after = 2")
    old.rt.start("load", wanted=True)
    await old.until(S.READY)
    while old.store.flags("m").lkg_revision is None:
        await asyncio.sleep(0.005)  # the stable timer's 10 ms
    await old.rt.stop("reload", remember=False)
    lkg = old.rt.cfg.revision
    shard = v1 / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    new.rt.start("reload")
    await new.until(S.QUARANTINED)
    assert new.rt.last_error is not None and "SNAPSHOT_CORRUPT" in new.rt.last_error.message
    assert new.store.flags("m").lkg_revision == lkg != new.rt.cfg.revision
    assert ("BACKOFF", "ROLLING_BACK") in new.states() and ("ROLLING_BACK", "QUARANTINED") in new.states()
    assert ("ROLLING_BACK", "STARTING") not in new.states()  # never spawned on the truncated weights
    assert len(new.factory.workers) == 2 and all(w.closes for w in new.factory.workers)
    assert new.rt.worker is None
