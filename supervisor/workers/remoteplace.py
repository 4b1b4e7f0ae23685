"""What a member takes from a peer's RankPlace (protocol.peer), and what it never does.

A peer is trusted to place ranks, not to run commands on this host. So, before anything is spawned
or written: the environment it names holds only MLX's own distributed variables, each in the
shape MLX reads (a PYTHONPATH, LD_PRELOAD, PYTHONWARNINGS or MLX_MPI_LIBNAME would run code in the
rank's interpreter); every name that becomes part of a path here (the group, the model id) is one
safe path component; of the rank's Init, the owner decides the five numbers it owns
(protocol.peer.RANK_INIT_FIELDS), nothing more (never a prefix-cache directory, a path or the
group's shape: every other field must be at its default, or the place's own model, revision and
path); and the model path is resolved here against this host's own model_roots, the resolved path
being what the rank loads. The codec has already checked every field's type (a nested Init's too).
A refusal here is a BAD_REQUEST naming the field; the control server logs it as
`peer.rank_refused` and answers the owner."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import stat

from protocol import errors as E
from protocol.limits import MAX_NAME_CHARS, MAX_PATH_CHARS
from protocol.messages import Init
from protocol.peer import RANK_INIT_FIELDS, RankPlace
from supervisor import confinement
from supervisor.config import path_component_problem
from supervisor.topology import BACKENDS, PARALLEL

MAX_GROUP_SIZE = 256
_DIGITS = re.compile(r"[0-9]{1,4}")
_FLAG = re.compile(r"[01]")
_ADDRESS = re.compile(r"[A-Za-z0-9.\-\[\]:]{1,250}:[0-9]{1,5}")  # host:port (an IPv6 host in brackets)
# MLX's variables for a rank (mx.distributed; mlx.launch sets the same). MLX_HOSTFILE is not among
# them: the member writes its own copy of the ring's hostfile and names that. MLX_IBV_DEVICES is
# the owner's path to jaccl's device matrix: read here, checked and copied (see devices()).
PEER_ENV = {
    "MLX_RANK": _DIGITS, "MLX_WORLD_SIZE": _DIGITS, "MLX_RING_VERBOSE": _FLAG, "MLX_JACCL_RING": _FLAG,
    "MLX_JACCL_COORDINATOR": _ADDRESS, "MLX_IBV_DEVICES": None,
}
MAX_DEVICES_BYTES = 64 * 1024


def refuse(field: str, problem: str) -> E.BadRequest:
    return E.BadRequest(f"rank_place: {field} {problem}", param=field)


def check(msg: RankPlace, roots: tuple[str, ...]) -> tuple[dict[str, str], str]:
    """(the rank's MLX variables from the peer, the model path resolved under this host's
    model_roots), or the BadRequest (SnapshotNotFound for the path) that refuses the place."""
    for field in ("group", "model"):
        value = getattr(msg, field)
        problem = path_component_problem(value) if isinstance(value, str) else "expected a string"
        if problem:
            raise refuse(field, f"is not a safe name: {problem}")
    if not isinstance(msg.revision, str) or len(msg.revision) > MAX_NAME_CHARS:
        raise refuse("revision", "expected a short string")
    _shape(msg)
    _init(msg)
    env = _env(msg)
    if not isinstance(msg.path, str) or not msg.path or len(msg.path) > MAX_PATH_CHARS:
        raise refuse("path", f"expected a path of at most {MAX_PATH_CHARS} characters")
    try:
        real = confinement.check_path(msg.path, roots)
    except confinement.Refused as exc:
        raise E.SnapshotNotFound(f"model path {exc}", file=msg.path[:MAX_PATH_CHARS]) from None
    return env, real


def _shape(msg: RankPlace) -> None:
    if not all(type(v) is int for v in (msg.rank, msg.size)) or not 0 <= msg.rank < msg.size <= MAX_GROUP_SIZE:
        raise refuse("rank", f"expected 0 <= rank < size <= {MAX_GROUP_SIZE}, got {msg.rank!r} of {msg.size!r}")
    if msg.backend not in BACKENDS:
        raise refuse("backend", f"expected one of {', '.join(BACKENDS)}")
    if msg.parallel not in PARALLEL:
        raise refuse("parallel", "expected \"\", \"tensor\" or \"pipeline\"")
    hosts = msg.hostfile
    if not isinstance(hosts, list) or len(hosts) > msg.size or not all(
            isinstance(h, list) and 1 <= len(h) <= 8 and all(isinstance(a, str) and _ADDRESS.fullmatch(a) for a in h)
            for h in hosts):
        raise refuse("hostfile", "expected at most one [\"host:port\", ...] list per rank")


def _init(msg: RankPlace) -> None:
    # What a field the owner does not decide must hold: what the member would put there itself.
    own = Init(msg.model, msg.revision, msg.path, 0.0, 0.0)
    for f in dataclasses.fields(Init):
        value = getattr(msg.init, f.name)
        if f.name not in RANK_INIT_FIELDS:
            if value != getattr(own, f.name):
                raise refuse(f"init.{f.name}", "is not a field a peer decides (only "
                             f"{', '.join(RANK_INIT_FIELDS)})")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1 << 62:
            raise refuse(f"init.{f.name}", "expected a non-negative number")


def _env(msg: RankPlace) -> dict[str, str]:
    if not isinstance(msg.env, dict):
        raise refuse("env", "expected a map of MLX's variables")
    env: dict[str, str] = {}
    for name, value in msg.env.items():
        shown = str(name)[:64]
        if name not in PEER_ENV:
            raise refuse(f"env.{shown}", f"is not a variable a peer may set here (only {', '.join(PEER_ENV)})")
        pattern = PEER_ENV[name]
        if not isinstance(value, str) or (pattern is not None and not pattern.fullmatch(value)):
            raise refuse(f"env.{name}", f"has a value MLX would not read: {str(value)[:64]!r}")
        env[name] = value
    for name, want in (("MLX_RANK", msg.rank), ("MLX_WORLD_SIZE", msg.size)):
        if name in env and int(env[name]) != want:
            raise refuse(f"env.{name}", f"is {env[name]}, but the place is rank {msg.rank} of {msg.size}")
    return env


def devices(env: dict[str, str]) -> str | None:
    """jaccl's device matrix as JSON text, read from the owner's MLX_IBV_DEVICES path: only a
    regular file (never a FIFO, device or socket: opening one blocks or reads something else), at
    most MAX_DEVICES_BYTES, holding one list per rank. The member writes its own copy for the rank."""
    path = env.pop("MLX_IBV_DEVICES", None)
    if path is None:
        return None
    if not os.path.isabs(path) or "\x00" in path or len(path) > MAX_PATH_CHARS:
        raise refuse("env.MLX_IBV_DEVICES", "expected an absolute path")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_DEVICES_BYTES:
                raise refuse("env.MLX_IBV_DEVICES", f"is not a regular file of at most {MAX_DEVICES_BYTES} bytes")
            matrix = json.loads(os.read(fd, MAX_DEVICES_BYTES))
        finally:
            os.close(fd)
    except (OSError, ValueError) as exc:
        raise refuse("env.MLX_IBV_DEVICES", f"is unreadable here: {type(exc).__name__}") from None
    if not isinstance(matrix, list) or not all(isinstance(row, list) for row in matrix):
        raise refuse("env.MLX_IBV_DEVICES", "does not hold a device matrix (a list of lists)")
    return json.dumps(matrix)
