"""Supervisor chaos soak: the supervisor's own failure modes, from outside, in a loop. Beside the
worker soak (tests/test_soak.py), which kills workers; this one does what an operator, a client or
another process on the machine does to the daemon itself: SIGHUP storms, lmxctl load / unload /
swap / rollback / release races, the store held locked by another process (while serving, and
while the daemon starts), SIGKILLs of the supervisor at random points followed by a restart, and
bad requests on the connection of good streams. Every round asserts: each model in the state the
round left it in, one live worker per loaded model and no untracked worker, no good stream failed
by another request's error, and nothing lost from the store (quarantine, last-known-good, wanted
flags, swaps), read back through `lmxctl status --json` and the control socket.

LMX_SOAK_ROUNDS sets the count (small by default, so CI runs it); LMX_SOAK_SEED replays a run. The
first rounds take each kind of chaos once, in an order the seed picks; later ones pick at random."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from protocol import errors as E
from protocol.client import SupervisorClient
from protocol.messages import GenerateRequest, Message
from tests.harness import REPO, RunningSupervisor, wait_until, workers_of
from tests.test_store_guard import Locker

ROUNDS = int(os.environ.get("LMX_SOAK_ROUNDS", "5"))
SEED = int(os.environ.get("LMX_SOAK_SEED", str(random.randrange(1 << 30))))
MODELS = ("a", "b")
KINDS = ("sighup_storm", "admin_race", "store_lock", "sigkill", "quarantine")
HUGE = 2_000_000  # over protocol.limits.MAX_TOKENS
ORPHAN_GRACE_S = 8.0
SUPERVISOR = {"heartbeat_interval_s": 0.1, "heartbeat_timeout_s": 3.0, "orphan_grace_s": ORPHAN_GRACE_S,
              "crash_loop_starts": 1000, "store_lock_wait_s": 30.0}
RESTART = {"quarantine_after": 2, "window_s": 600, "backoff_initial_s": 0.05, "backoff_max_s": 0.2,
           "stable_after_s": 0.5}


class Raw(Message):
    """A body as another library might send it: any tag, any fields (sent unchecked)."""

    def __init__(self, tag: str, fields: Any) -> None:
        self.TAG, self._fields = tag, fields

    def to_wire(self) -> Any:
        return self._fields


class Soak:
    """The supervisor under test and what the rounds so far should have left in it."""

    def __init__(self, sup: RunningSupervisor, tiny_model: Path, rng: random.Random) -> None:
        self.sup, self.tiny, self.rng = sup, tiny_model, rng
        self.canary_timeout = {m: 60.0 for m in MODELS}  # a changed value is a new revision
        self.state = {m: "READY" for m in MODELS}        # what each runtime should settle in
        self.wanted: dict[str, bool | None] = {m: None for m in MODELS}
        self.aliases: dict[str, str] = {}                # swap OLD NEW: OLD -> NEW
        self.lkg: dict[str, str | None] = {m: None for m in MODELS}
        self.log: list[str] = []

    # --- the config -----------------------------------------------------------------------------
    def models(self) -> list[dict]:
        return [{"id": m, "path": str(self.tiny), "canary": {"prompt": "Hi", "max_tokens": 4,
                                                             "timeout_s": self.canary_timeout[m]}}
                for m in MODELS]

    def write_config(self) -> None:
        self.sup.rewrite(self.models(), supervisor=SUPERVISOR, restart=RESTART)

    # --- reading the daemon ---------------------------------------------------------------------
    def status(self) -> dict | None:
        try:
            return self.sup.status()
        except E.LmxError:
            return None

    def by_id(self, status: dict) -> dict[str, dict]:
        return {m["id"]: m for m in status["models"]}

    def lmxctl(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "lmxctl", "--state-dir", str(self.sup.state_dir),
                                 "--timeout", "120", *args], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def lmxctl_json_status(self) -> dict:
        proc = self.lmxctl("status", "--json")
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        return json.loads(out)

    def routable(self) -> list[str]:
        """Names a client may send to now: READY models, and swapped-out names whose model is READY."""
        names = [m for m in MODELS if self.state[m] == "READY" and m not in self.aliases]
        names += [old for old, new in self.aliases.items() if self.state[new] == "READY"]
        return names

    def resolve(self, name: str) -> str:
        return self.aliases.get(name, name)

    # --- after every round ------------------------------------------------------------------------
    def settle(self, what: str, timeout_s: float = 90.0) -> dict[str, dict]:
        """Every model in the state it should be, then exactly one live worker per loaded model."""
        def settled() -> dict | None:
            status = self.status()
            if status is None:
                return None
            models = self.by_id(status)
            for m in MODELS:
                got = models[m]
                if got["state"] != self.state[m]:
                    return None
                if (got["worker_pid"] is not None) != (self.state[m] == "READY"):
                    return None
            return status

        try:
            status = wait_until(settled, timeout_s, f"{what}: every model in its state")
        except AssertionError:
            raise AssertionError(f"{what}: expected {self.state}, got "
                                 f"{[(m['id'], m['state'], m['last_error']) for m in (self.status() or {'models': []})['models']]}")
        self.sup._remember(status)

        def one_worker_each() -> bool:
            tracked = {m["worker_pid"] for m in self.sup.status()["models"] if m["worker_pid"]}
            return workers_of(self.sup.state_dir) == tracked
        # A worker the supervisor was starting when it was SIGKILLed waits out its orphan grace.
        try:
            wait_until(one_worker_each, ORPHAN_GRACE_S + 15, f"{what}: one worker per loaded model")
        except AssertionError:
            raise AssertionError(f"{what}: workers {workers_of(self.sup.state_dir)} vs status "
                                 f"{[(m['id'], m['state'], m['worker_pid']) for m in self.sup.status()['models']]}")
        wait_until(lambda: not self.sup.status()["supervisor"]["store_degraded"], 30, f"{what}: store writes land")
        return self.by_id(self.sup.status())

    def check_store(self, what: str) -> dict[str, dict]:
        """The flags the store holds, through `lmxctl status --json`, as the rounds left them."""
        status = self.lmxctl_json_status()
        sup = status["supervisor"]
        assert sup["store_degraded"] is False and sup["store_pending_writes"] == 0, (what, sup)
        assert sup["safe_mode"] is False
        models = self.by_id(status)
        for m in MODELS:
            got = models[m]
            assert got["state"] == self.state[m], (what, m, got["state"], self.state[m])
            assert got["quarantined"] == (self.state[m] == "QUARANTINED"), (what, m, got)
            assert got["wanted"] == self.wanted[m], (what, m, "wanted", got["wanted"], self.wanted[m])
            if self.lkg[m] is not None:  # once known, never forgotten
                assert got["lkg_revision"] is not None, (what, m, "lost its last-known-good revision")
            self.lkg[m] = got["lkg_revision"]
        for old, new in self.aliases.items():  # a swap holds: OLD's name is served by NEW
            assert models[old]["state"] == "UNLOADED", (what, old, models[old]["state"])
            if self.state[new] == "READY":
                assert self.sup.client.complete(old, "Hello", max_tokens=2).usage["completion_tokens"] >= 1
        return models


class Traffic:
    """Good streams and bad requests on one client connection, in a thread, while the round's chaos
    runs: the bad ones are refused with their own codes, the good ones run to their end."""

    def __init__(self, soak: Soak, names: list[str], rng: random.Random) -> None:
        self.soak = soak
        self.streams = [(name, rng.randrange(120, 260)) for name in names]
        self.bad = rng.sample(["raw_max_tokens", "unknown_field", "wrong_type", "garbage", "library_max_tokens",
                               "unknown_model", "bad_timeout"], k=rng.randrange(2, 5))
        self.started = threading.Event()
        self.good: list[tuple[str, int, str, Any]] = []  # (name, max_tokens, streamed text, Result or code)
        self.refused: dict[str, str] = {}
        self.error: BaseException | None = None
        self.progress = 0  # characters streamed so far, over all good streams
        self.done = False
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Traffic":
        self.thread.start()
        wait_until(lambda: self.started.is_set() or not self.thread.is_alive(), 60, "the good streams to begin")
        if self.error is not None:
            raise self.error
        return self

    def __exit__(self, *exc: Any) -> None:
        self.thread.join(120)
        assert not self.thread.is_alive(), "traffic did not end"

    def _run(self) -> None:
        try:
            asyncio.run(self._traffic())
        except BaseException as exc:  # reported to the test thread
            self.error = exc
        finally:
            self.done = True
            self.started.set()

    async def _traffic(self) -> None:
        async with SupervisorClient(state_dir=self.soak.sup.state_dir, timeout_s=90) as client:
            streams = [client.generate(name, "Tell me a story about the sea.", max_tokens=n) for name, n in self.streams]
            firsts = [await asyncio.wait_for(s.__anext__(), 30) for s in streams]  # all generating
            self.started.set()
            bad = asyncio.gather(*(self._bad_bounded(client, kind) for kind in self.bad))
            good = asyncio.gather(*(self._finish(s, f) for s, f in zip(streams, firsts)))
            for (name, n), (text, end) in zip(self.streams, await good):
                self.good.append((name, n, text, end))
            await bad

    async def _finish(self, stream: Any, first: Any) -> tuple[str, Any]:
        text = first.text
        try:
            async for chunk in stream:
                text += chunk.text
                self.progress += len(chunk.text)
            return text, stream.result
        except E.LmxError as exc:
            return text, exc.code.code

    async def _bad_bounded(self, client: SupervisorClient, kind: str) -> None:
        try:
            await asyncio.wait_for(self._bad(client, kind), 30)
        except asyncio.TimeoutError:
            self.refused[f"bad-{kind}"] = "no reply"

    async def _bad(self, client: SupervisorClient, kind: str) -> None:
        rid = f"bad-{kind}"
        model = self.streams[0][0]
        try:
            if kind == "library_max_tokens":
                await client.complete(model, "Hi", max_tokens=HUGE)  # refused before the wire
            elif kind == "unknown_model":
                await client.complete("no-such-model", "Hi", max_tokens=4)
            elif kind == "garbage":  # no request id to answer: costs nothing, nobody's reply
                await client.connection.send(Raw("garbage", ["not", "a", "map"]))
                self.refused[rid] = "sent"
                return
            else:
                async with await client.connection.replies(rid) as replies:
                    if kind == "raw_max_tokens":  # what another library might send
                        await client.connection.send(GenerateRequest(rid, model, "Hi", max_tokens=HUGE))
                    elif kind == "bad_timeout":
                        await client.connection.send(GenerateRequest(rid, model, "Hi", max_tokens=4, timeout_s=-1.0))
                    else:
                        fields = {"request_id": rid, "model": model, "prompt": "Hi"}
                        fields.update({"colour": "red"} if kind == "unknown_field" else {"prompt": 7})
                        await client.connection.send(Raw("generate", fields))
                    reply = await asyncio.wait_for(replies.get(), 30)
                self.refused[rid] = getattr(reply, "code", None) or type(reply).__name__
                return
            self.refused[rid] = "accepted"
        except E.LmxError as exc:
            self.refused[rid] = exc.code.code
        except asyncio.TimeoutError:
            self.refused[rid] = "no reply"

    def check(self, what: str, supervisor_killed: bool) -> None:
        if self.error is not None:
            raise self.error
        allowed_gone = {"SUPERVISOR_UNAVAILABLE"} if supervisor_killed else set()
        for name, n, text, end in self.good:
            if isinstance(end, str):  # an error code
                assert end in allowed_gone, f"{what}: a good stream on {name} failed with {end}"
                continue
            assert end is not None and end.finish_reason in ("stop", "length"), (what, name, end)
            assert text == end.text, (what, name, "streamed text differs from the final")
            if end.finish_reason == "length":
                assert end.usage["completion_tokens"] == n, (what, name, end.usage)
        expected = {"bad-raw_max_tokens": "BAD_REQUEST", "bad-unknown_field": "BAD_REQUEST",
                    "bad-wrong_type": "BAD_REQUEST", "bad-garbage": "sent", "bad-library_max_tokens": "BAD_REQUEST",
                    "bad-unknown_model": "UNKNOWN_MODEL", "bad-bad_timeout": "BAD_REQUEST"}
        for rid, code in self.refused.items():
            if supervisor_killed and code in ("SUPERVISOR_UNAVAILABLE", "no reply"):
                continue
            assert code == expected[rid], f"{what}: {rid} got {code}, not {expected[rid]}"


def _wait_procs(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=180)
        out.append((p.returncode, stdout + stderr))
    return out


# --- the kinds of chaos -----------------------------------------------------------------------------

def sighup_storm(s: Soak, what: str) -> None:
    """Several SIGHUPs a few ms apart; maybe with one READY model's section changed (a new revision).
    The storm applies the file once: unchanged models keep their worker, nothing is un-quarantined."""
    candidates = [m for m in MODELS if s.state[m] == "READY" and m not in s.aliases.values()]
    changed = s.rng.choice(candidates + [None]) if candidates else None
    before = s.by_id(s.sup.status())
    if changed:
        s.canary_timeout[changed] = 61.0 if s.canary_timeout[changed] == 60.0 else 60.0
        s.write_config()
    n = s.rng.randrange(3, 6)
    reloads = len(s.sup.events("config.reloaded"))
    s.log.append(f"{what}: {n} SIGHUPs, changed {changed}")
    for i in range(n):
        s.sup.proc.send_signal(signal.SIGHUP)
        if i < n - 1:
            time.sleep(s.rng.uniform(0.002, 0.03))  # the gap under test, not a wait for a condition
    # SIGHUPs that arrive while one is still pending merge into one (POSIX signals do not queue):
    # at least one reload, the changed model applied exactly once, every other reload a no-op.
    def reloaded() -> list | None:
        applied = [e["changed"] for e in s.sup.events("config.reloaded")[reloads:]]
        return applied if applied and (not changed or [changed] in applied) else None
    applied = wait_until(reloaded, 60, f"{what}: the storm's reloads")
    assert applied.count([changed]) == (1 if changed else 0), (what, applied)
    assert all(c == [] for c in applied if c != [changed]), (what, applied)
    after = s.settle(what)
    for m in MODELS:
        if m != changed and s.state[m] == "READY":
            assert after[m]["worker_pid"] == before[m]["worker_pid"], f"{what}: {m} was restarted by a no-op reload"
    if changed:
        assert after[changed]["revision"] == after[changed]["configured_revision"] != before[changed]["revision"]


def admin_race(s: Soak, what: str) -> None:
    """lmxctl subprocesses (and client calls) on the same models at the same time."""
    options = []
    plain = [m for m in MODELS if m not in s.aliases and m not in s.aliases.values()]
    for m in plain:
        if s.state[m] in ("READY", "UNLOADED"):  # an UNLOADED model is more often brought back
            options += [("load_vs_unload", m), ("unload_then_load", m)]
            options += [("double_load", m)] * (3 if s.state[m] == "UNLOADED" else 1)
        if s.state[m] == "QUARANTINED":
            options += [("double_release", m)] * 3
        if s.state[m] in ("READY", "QUARANTINED") and s.lkg[m]:
            options += [("double_rollback", m)] * (3 if s.state[m] == "QUARANTINED" else 1)
    if not s.aliases and all(s.state[m] == "READY" for m in MODELS):
        options += [("swap", None)] * 2
    for old in s.aliases:
        options += [("reclaim", old)] * 2
    race, m = s.rng.choice(options)
    s.log.append(f"{what}: {race} {m or ''}")
    if race == "load_vs_unload":
        results = _wait_procs([s.lmxctl("unload", m), s.lmxctl("load", m)] if s.rng.random() < 0.5
                              else [s.lmxctl("load", m), s.lmxctl("unload", m)])
        assert all(rc == 0 for rc, _ in results), (what, results)
        # Either order is the operator's last word; what matters is that state and flag agree.
        status = wait_until(lambda: (lambda st: st if st[m]["state"] in ("READY", "UNLOADED") else None)(
            s.by_id(s.sup.status())), 60, f"{what}: {m} settled")
        s.state[m] = status[m]["state"]
        s.wanted[m] = status[m]["state"] == "READY"
        assert status[m]["wanted"] == s.wanted[m], (what, status[m])
    elif race == "unload_then_load":
        async def go() -> tuple[dict, dict]:
            async with SupervisorClient(state_dir=s.sup.state_dir, timeout_s=120) as client:
                unload = asyncio.ensure_future(client.unload(m))
                await asyncio.sleep(s.rng.uniform(0.0, 0.1))  # the gap under test
                return await unload, await client.load(m, timeout_s=120)
        asyncio.run(go())
        s.state[m], s.wanted[m] = "READY", True
    elif race == "double_load":
        if s.state[m] == "READY":
            assert s.sup.client.unload(m)["state"] == "UNLOADED"
        results = _wait_procs([s.lmxctl("load", m) for _ in range(s.rng.randrange(2, 4))])
        assert all(rc == 0 for rc, _ in results), (what, results)
        s.state[m], s.wanted[m] = "READY", True
    elif race == "double_release":
        results = _wait_procs([s.lmxctl("release", m), s.lmxctl("release", m)])
        # One releases; the other finds it no longer QUARANTINED (BAD_REQUEST), never a second worker.
        assert sorted(rc for rc, _ in results) in ([0, 0], [0, 1]), (what, results)
        assert all(rc == 0 or "BAD_REQUEST" in out for rc, out in results), (what, results)
        s.state[m], s.wanted[m] = "READY", True
    elif race == "double_rollback":
        target = s.lkg[m]
        results = _wait_procs([s.lmxctl("rollback", m), s.lmxctl("rollback", m)])
        assert all(rc == 0 for rc, _ in results), (what, results)
        s.state[m], s.wanted[m] = "READY", True
        after = s.settle(what)
        assert after[m]["revision"] == target, (what, after[m])
    elif race == "swap":
        old, new = s.rng.sample(MODELS, 2)
        swap = s.lmxctl("swap", old, new)
        loads = [s.lmxctl("load", new)]  # races the swap; NEW is READY already, so a no-op either way
        results = _wait_procs([swap, *loads])
        assert all(rc == 0 for rc, _ in results), (what, results)
        s.aliases[old] = new
        s.state[old], s.wanted[old] = "UNLOADED", False
    elif race == "reclaim":
        new = s.aliases.pop(m)
        results = _wait_procs([s.lmxctl("load", m), s.lmxctl("load", m)])
        assert all(rc == 0 for rc, _ in results), (what, results)
        s.state[m], s.wanted[m] = "READY", True
        assert s.state[new] == "READY"
    s.settle(what)


def quarantine(s: Soak, what: str, target: str, settle: bool = True) -> None:
    """Kill a model's worker from outside until it is QUARANTINED (quarantine_after = 2; a newer
    revision may be rolled back to last-known-good first)."""
    s.log.append(f"{what}: quarantine {target}")
    for _ in range(8):
        m = s.sup.wait_model(target, lambda m: m["state"] in ("READY", "QUARANTINED"), 60, f"{what}: READY to kill")
        if m["state"] == "QUARANTINED":
            break
        os.kill(m["worker_pid"], signal.SIGKILL)
        s.sup.wait_model(target, lambda x: x["worker_pid"] != m["worker_pid"], 30, f"{what}: the death seen")
    s.state[target] = "QUARANTINED"
    if settle:  # not while the store is held locked: settling waits for the writes to land
        s.settle(what)


def store_lock(s: Soak, what: str, target: str | None) -> None:
    """Another process holds the store's write lock while the round changes what the store must
    keep: the one model it may kill or unload is `target` (no good stream goes to it)."""
    locker = Locker(s.sup.state_dir / "store.sqlite3")
    try:
        writes = []
        if target is not None and target not in s.aliases.values():
            writes += [("unload", target), ("quarantine", target)]
        for m in MODELS:
            if m in s.aliases or m in s.aliases.values():
                continue
            if s.state[m] == "UNLOADED":
                writes += [("load", m)] * 2
            elif s.state[m] == "QUARANTINED":
                writes += [("release", m)] * 2
        op, m = s.rng.choice(writes or [("none", None)])
        s.log.append(f"{what}: store locked, {op} {m or ''}")
        if op == "unload":
            s.sup.client.unload(m)
            s.state[m], s.wanted[m] = "UNLOADED", False
        elif op == "load":
            s.sup.client.load(m)
            s.state[m], s.wanted[m] = "READY", True
        elif op == "release":
            s.sup.client.release(m)
            s.state[m], s.wanted[m] = "READY", True
        elif op == "quarantine":
            quarantine(s, what, m, settle=False)
        if op != "none":
            wait_until(lambda: s.sup.status()["supervisor"]["store_degraded"], 30, f"{what}: store_degraded shown")
        # While degraded, status answers from what the supervisor holds: the round's word already.
        models = s.by_id(s.sup.status())
        wait_until(lambda: all(s.by_id(s.sup.status())[x]["state"] == s.state[x] for x in MODELS), 60,
                   f"{what}: states while the store is locked")
        models = s.by_id(s.sup.status())
        for x in MODELS:
            assert models[x]["wanted"] == s.wanted[x], (what, x, models[x]["wanted"], s.wanted[x])
    finally:
        locker.release()
    s.settle(what)


def sigkill(s: Soak, what: str, traffic: "Traffic | None") -> bool:
    """SIGKILL the supervisor at a random point, start it again (sometimes with the store locked
    while it starts), and find everything as it was."""
    point = s.rng.choice(["mid_stream", "after_ack", "mid_reload", "right_away"])
    before = s.by_id(s.sup.status())
    s.log.append(f"{what}: SIGKILL {point}")
    if point == "after_ack":
        plain = [m for m in MODELS if m not in s.aliases and m not in s.aliases.values()
                 and s.state[m] in ("READY", "UNLOADED")]
        if plain:
            m = s.rng.choice(plain)
            if s.state[m] == "READY":
                s.sup.client.unload(m)  # acknowledged: it must outlive the kill
                s.state[m], s.wanted[m] = "UNLOADED", False
            else:
                assert s.sup.client.load(m)["started"] is True
                s.state[m], s.wanted[m] = "READY", True
    elif point == "mid_reload":
        s.sup.proc.send_signal(signal.SIGHUP)
        s.sup.proc.send_signal(signal.SIGHUP)
    elif point == "mid_stream" and traffic is not None:  # some way into the round's streams
        chars = s.rng.randrange(10, 200)
        wait_until(lambda: traffic.progress >= chars or traffic.done, 30, f"{what}: {chars} characters streamed")
    s.sup.proc.send_signal(signal.SIGKILL)
    s.sup.proc.wait(timeout=30)
    locked = s.rng.random() < 0.5
    if locked:
        waited = len(s.sup.events("store.lock_waiting"))
        locker = Locker(s.sup.state_dir / "store.sqlite3")
        try:
            s.sup.start(wait_ready=False)
            wait_until(lambda: len(s.sup.events("store.lock_waiting")) > waited or s.sup.proc.poll() is not None,
                       30, f"{what}: the restarted supervisor waits for the store")
            assert s.sup.proc.poll() is None, "the supervisor gave up on a store locked for a moment"
        finally:
            locker.release()
        s.log[-1] += " (store locked at start)"
    else:
        s.sup.start(wait_ready=False)
    wait_until(s.status, 60, f"{what}: the supervisor answers again")
    after = s.settle(what)
    assert not list(s.sup.state_dir.glob("store.sqlite3.corrupt-*")), "a store was moved aside"
    if point in ("mid_stream", "right_away"):
        for m in MODELS:  # adopted, not reloaded: the same worker, the same revision
            if s.state[m] == "READY":
                assert after[m]["worker_pid"] == before[m]["worker_pid"], (what, m, "not adopted")
                assert after[m]["revision"] == before[m]["revision"], (what, m)
    return True


@pytest.mark.soak
@pytest.mark.timeout(120 + 60 * ROUNDS)
def test_supervisor_chaos_keeps_every_invariant(make_supervisor, tiny_model: Path) -> None:
    rng = random.Random(SEED)
    print(f"supervisor soak seed {SEED}, {ROUNDS} rounds")
    sup = make_supervisor([], supervisor=SUPERVISOR, restart=RESTART)
    s = Soak(sup, tiny_model, rng)
    s.write_config()
    sup.start()
    s.settle("start")
    s.check_store("start")
    order = list(KINDS)
    rng.shuffle(order)
    try:
        for n in range(ROUNDS):
            kind = order[n] if n < len(order) else rng.choice(KINDS)
            what = f"seed {SEED} round {n} {kind}"
            # A model whose worker the round kills on purpose gets no good stream (its streams fail
            # with WORKER_CRASHED by design); the other model's streams must not notice.
            target = None
            if kind in ("quarantine", "store_lock"):
                ready = [m for m in MODELS if s.state[m] == "READY" and m not in s.aliases]
                target = rng.choice(ready) if ready else None
            names = [x for x in s.routable() if s.resolve(x) != target]
            streams = rng.sample(names, k=min(len(names), rng.randrange(1, 3)))
            killed = False
            if streams:
                with Traffic(s, streams, rng) as traffic:
                    killed = run_kind(s, kind, what, target, traffic)
                traffic.check(what, killed)
            else:
                s.log.append(f"{what}: no model to stream to")
                killed = run_kind(s, kind, what, target, None)
            s.check_store(what)
            assert sup.proc.poll() is None, f"{what}: the supervisor exited"
    finally:
        print("\n".join(s.log))
    # A clean stop at the end: nothing outlives the supervisor.
    assert sup.stop() == 0
    wait_until(lambda: not workers_of(sup.state_dir), 15, "no worker after a clean exit")


def run_kind(s: Soak, kind: str, what: str, target: str | None, traffic: "Traffic | None") -> bool:
    if kind == "sigkill":
        return sigkill(s, what, traffic)
    if kind == "quarantine":
        quarantine(s, what, target) if target else admin_race(s, what)
    elif kind == "store_lock":
        store_lock(s, what, target)
    else:
        {"sighup_storm": sighup_storm, "admin_race": admin_race}[kind](s, what)
    return False
