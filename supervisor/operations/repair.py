"""`lmxctl repair MODEL`: fetch what the checks find missing or corrupt from the model's source
(mirror or hub), verify again, and if the model was REJECTED for it, admit it again."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol import errors as E
from supervisor.admission import checksums, fetching, snapshot

if TYPE_CHECKING:
    from supervisor.lifecycle.runtime import ModelRuntime


async def repair(rt: "ModelRuntime") -> dict[str, Any]:
    source = fetching.source_for(rt.running, rt.config.supervisor)
    root = Path(rt.running.path)
    findings = snapshot.verify(root)
    if rt.running.checksums and not findings:
        # An operator asks because something is wrong: read every file again, trust no cached hash.
        findings = await asyncio.to_thread(checksums.verify, rt.store, str(root), True)
    try:
        wanted = await asyncio.to_thread(fetching.wanted_files, root, findings, source)
        rt.log.info("model.repair", files=sorted(wanted), bytes=sum(wanted.values()), source=source.description)
        loop, total = asyncio.get_running_loop(), sum(wanted.values())

        def progress(name: str, done: int) -> None:  # runs in the fetching thread
            loop.call_soon_threadsafe(lambda: rt.events.publish(
                "model.repair_progress", model=rt.cfg.id, file=name, done_bytes=done, total_bytes=total))

        written = await asyncio.to_thread(fetching.fetch, root, source, wanted, progress) if wanted else 0
    except E.LmxError:
        raise
    except Exception as exc:  # the hub or the mirror failed: say which, keep the daemon up
        rt.log.warning("model.repair_failed", source=source.description, error=repr(exc))
        raise E.SnapshotIncomplete(f"repair from {source.description} failed: {exc}") from None
    after = snapshot.verify(root)
    if not after:  # the refusal was about what repair fixed
        rt.repaired()
    return {"fetched": sorted(wanted), "bytes": written, "source": source.description,
            "findings": [f.to_dict() for f in after], "state": rt.state.value}
