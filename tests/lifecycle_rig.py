"""The in-process lifecycle rig (tests/test_lifecycle_inprocess*.py): a real ModelRuntime on a
FakeFactory (tests/fakeworker.py), a real store in tmp_path, the events it publishes as a list, and
every effect it performs recorded."""

from __future__ import annotations

import asyncio
import functools
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

from protocol import errors as E
from protocol.messages import Error, Final, GenerateRequest, Message
from supervisor import config as cfg_mod
from supervisor.admission.memory import MemoryLedger
from supervisor.lifecycle import effects as X
from supervisor.lifecycle.runtime import ModelRuntime
from supervisor.lifecycle.states import ModelState as S
from supervisor.persistence.store import Store
from supervisor.services import Services
from tests.fakeworker import FakeFactory

# Every effect some runtime of these two files performed (test_every_effect_is_performed reads it).
PERFORMED: set[type] = set()
RIGGED: set[str] = set()  # the modules whose tests built a rig


def inloop(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """An async test, run in its own loop, bounded."""
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 10))
    return run


class Published:
    """The events socket, as a list."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def publish(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))


@dataclass
class Rig:
    rt: ModelRuntime
    factory: FakeFactory
    store: Store
    published: Published
    config: cfg_mod.Config
    performed: list[X.Effect] = field(default_factory=list)

    def states(self) -> list[tuple[str, str]]:
        return [(f["from"], f["to"]) for e, f in self.published.events if e == "model.state"]

    def reasons(self) -> list[str]:
        return [f["reason"] for e, f in self.published.events if e == "model.state"]

    async def until(self, state: S, timeout_s: float = 5.0) -> None:
        try:
            await asyncio.wait_for(self.rt.until(lambda: self.rt.state is state), timeout_s)
        except asyncio.TimeoutError:
            raise AssertionError(f"not {state.value} within {timeout_s}s: {self.states()}") from None


_SUPERVISOR = {"drain_grace_s": "5.0", "stop_timeout_s": "1.0"}
_RESTART = {"backoff_initial_s": "0.01", "backoff_max_s": "0.02", "stable_after_s": "3600"}


def _table(defaults: dict[str, str], lines: str) -> str:
    keys = dict(defaults, **dict(ln.split(" = ", 1) for ln in lines.splitlines() if ln.strip()))
    return "".join(f"{k} = {v}\n" for k, v in keys.items())


def toml(model_dir: Path, restart: str = "", supervisor: str = "", model: str = "", model_id: str = "m") -> str:
    """A config of one model; `restart` and `supervisor` lines ("key = value") replace the quick defaults."""
    return (f"[supervisor]\n{_table(_SUPERVISOR, supervisor)}[restart]\n{_table(_RESTART, restart)}"
            f'[[models]]\nid = "{model_id}"\npath = "{model_dir}"\n{model}\n')


class RecordingRuntime(ModelRuntime):
    """A ModelRuntime that notes each effect as its one _perform takes it (those of its construction too)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.performed: list[X.Effect] = []
        super().__init__(*args, **kwargs)

    def _perform(self, effect: X.Effect) -> Any:
        self.performed.append(effect)
        PERFORMED.add(type(effect))
        return super()._perform(effect)


def rig(tmp_path: Path, model_dir: Path, factory: FakeFactory | None = None, store: Store | None = None,
        ledger: MemoryLedger | None = None, **toml_kw: str) -> Rig:
    """A runtime on a fake factory, in the calling test's loop (none: a test of construction alone)."""
    RIGGED.add(sys._getframe(1).f_globals["__name__"].rsplit(".", 1)[-1])
    config = cfg_mod.parse(toml(model_dir, **toml_kw))
    if store is None:
        (tmp_path / "state").mkdir(exist_ok=True)
        store = Store(tmp_path / "state")
        store.boot()
    published, factory = Published(), factory or FakeFactory()
    services = Services(config, store, None, "ipc://unused", events=published,  # type: ignore[arg-type]
                        **({"ledger": ledger} if ledger is not None else {}))
    rt = RecordingRuntime(config.models[0], services, factory=factory)
    return Rig(rt, factory, store, published, config, rt.performed)


def request(rid: str = "r1", **kw: Any) -> GenerateRequest:
    return GenerateRequest(request_id=rid, model="m", prompt="hi", **kw)


class Client:
    """A client's sink: what it was sent."""

    def __init__(self) -> None:
        self.got: list[Message] = []
        self.done = asyncio.Event()

    def __call__(self, msg: Message) -> None:
        self.got.append(msg)
        if isinstance(msg, (Final, Error)):
            self.done.set()

    @property
    def error(self) -> E.LmxError | None:
        last = self.got[-1] if self.got else None
        return last.to_exc() if isinstance(last, Error) else None


def performed(r: Rig, kind: type) -> list[Any]:
    return [e for e in r.performed if isinstance(e, kind)]
