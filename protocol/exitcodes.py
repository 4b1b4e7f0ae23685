"""Exit statuses a worker uses on purpose: part of the supervisor <-> worker contract."""

import enum


class WorkerExit(enum.IntEnum):
    OK = 0
    ORPHANED = 3  # its supervisor was gone for longer than orphan_grace_s
    LOAD_FAILED = 4  # the snapshot could not be loaded
    HANDSHAKE = 5  # no INIT arrived in time
    IO_FAILED = 6  # the IO thread broke: no heartbeats, no orphan timer, so the worker ends
