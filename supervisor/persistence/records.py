"""The typed records the store keeps and gives back: a model's failures, crashes, flags and live
worker. Plain frozen data, importable by every layer above persistence (a leaf: it imports nothing
of the project)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Failure:
    """One entry of a model's failure ledger, which the restart policy counts."""
    at: float  # wall-clock seconds: the ledger outlives the process, so monotonic time cannot
    revision: str
    code: str
    counted: bool = True  # an innocent victim restarts but is not held against its model
