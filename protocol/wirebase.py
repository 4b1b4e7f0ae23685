"""The base of every wire message: its tag, its fields as plain data, and `added()` (the version policy)."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass
class Message:
    """Base: every message has a wire tag (`TAG`) and plain-data fields."""

    TAG: ClassVar[str] = ""

    def to_wire(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, default in _added(type(self)):
            if out[name] == default:
                del out[name]
        for name in nested(type(self)):  # a message inside a message (the peer link's) is its fields
            value = out[name]
            if isinstance(value, Message):
                out[name] = value.to_wire()
        return out


def added(default: Any = None, *, factory: Any = None) -> Any:
    """A field added after its message first shipped: left off the wire while at its default, so a
    peer from before it, whose decoder refuses unknown fields, still reads the message (a newer
    supervisor serving through an adopted older worker; an older client)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"added": factory})
    return field(default=default, metadata={"added": lambda: default})


_ADDED: dict[type, tuple[tuple[str, Any], ...]] = {}


def _added(cls: type) -> tuple[tuple[str, Any], ...]:
    known = _ADDED.get(cls)
    if known is None:
        known = _ADDED[cls] = tuple((f.name, f.metadata["added"]()) for f in dataclasses.fields(cls)
                                    if "added" in f.metadata)
    return known


_NESTED: dict[type, dict[str, type[Message]]] = {}


def nested(cls: type) -> dict[str, type[Message]]:
    """The fields of `cls` that hold a message (field name -> its message type)."""
    known = _NESTED.get(cls)
    if known is None:
        hints = typing.get_type_hints(cls)
        known = _NESTED[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls)
                                if isinstance(hints[f.name], type) and issubclass(hints[f.name], Message)}
    return known
