"""One prefix cache file (worker.prefixdisk), trusted only after it passed every check: it is opened
without following links and only if it is a regular file (a FIFO named like an entry would block a
read forever), its arrays must fit the model's own cache layout (the classes, dtypes and shapes a
forward pass gives; only a KV cache's sequence axis may differ), and their bytes must match the
checksum written at store time. Files are mlx-lm's prompt-cache format (what `save_prompt_cache`
writes and `load_prompt_cache` reads), written and read here through a file descriptor."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import time
from dataclasses import dataclass
from typing import Any, BinaryIO

# O_NONBLOCK: opening a FIFO for reading returns at once instead of waiting for a writer.
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_HEADER_MAX = 64 * 2**20
# safetensors' dtype codes, by mlx dtype name
_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int8": "I8",
          "int16": "I16", "int32": "I32", "int64": "I64", "uint8": "U8", "uint16": "U16", "uint32": "U32",
          "uint64": "U64", "bool": "BOOL", "complex64": "C64"}
_KINDS = ((stat.S_ISLNK, "a symlink"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class Untrusted(ValueError):
    """The file is not a usable entry; the message says why."""


def special(mode: int) -> str | None:
    """What a non-regular file is ("a FIFO"...), from its lstat mode; None for a regular file."""
    return next((what for test, what in _KINDS if test(mode)), None if stat.S_ISREG(mode) else "not a regular file")


def open_regular(name: str, dir_fd: int) -> BinaryIO:
    """`name` in the directory, for reading: never through a link, never blocking, regular only."""
    try:
        fd = os.open(name, _OPEN_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (getattr(os, "ELOOP", -1), getattr(os, "EMLINK", -1)):
            raise Untrusted("a symlink, not a regular file") from None
        raise
    what = special(os.fstat(fd).st_mode)
    if what:
        os.close(fd)
        raise Untrusted(f"{what}, not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def create(name: str, dir_fd: int) -> BinaryIO:
    """A new file `name` (0600) in the directory, for writing; never an existing file or link."""
    return os.fdopen(os.open(name, _CREATE_FLAGS, 0o600, dir_fd=dir_fd), "wb")


def read_header(f: BinaryIO) -> dict[str, Any]:
    """The safetensors header (tensor dtypes, shapes and offsets, and `__metadata__`), not the tensors."""
    (n,) = struct.unpack("<Q", f.read(8))
    if n > _HEADER_MAX:
        raise Untrusted("header too large")
    header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise Untrusted("header is not a map")
    return header


def own_metadata(header: dict[str, Any]) -> dict[str, str]:
    """Our metadata: save_prompt_cache flattens [metadata, classes, scalars], ours are the "0." keys."""
    meta = header.get("__metadata__") or {}
    return {k[2:]: v for k, v in meta.items() if k.startswith("0.")}


@dataclass(frozen=True)
class Layout:
    """The model's prompt cache: each layer's class, every array's (dtype code, shape) by its flat key
    (None in a shape: a KV cache's sequence axis, any length), and the keys of the non-array leaves."""

    classes: tuple[str, ...]
    arrays: dict[str, tuple[str, tuple[int | None, ...]]]
    scalars: dict[str, type]

    def check(self, classes: list[str], arrays: dict[str, tuple[str, tuple[int, ...]]], scalars: set[str]) -> None:
        """Raises Untrusted unless an entry of these classes, arrays and scalar keys fits the model."""
        if tuple(classes) != self.classes:
            raise Untrusted(f"cache classes {_brief(classes)} are not the model's {_brief(self.classes)}")
        if set(scalars) != set(self.scalars) or set(arrays) != set(self.arrays):
            raise Untrusted("the arrays are not the model's cache layout")
        for key, (code, shape) in arrays.items():
            want_code, want_shape = self.arrays[key]
            if code != want_code:
                raise Untrusted(f"array {key} is {code}, the model's cache is {want_code}")
            if len(shape) != len(want_shape) or any(w is not None and s != w for s, w in zip(shape, want_shape)):
                raise Untrusted(f"array {key} has shape {list(shape)}, the model's cache has {_shape(want_shape)}")


def model_layout(model: Any) -> Layout:
    """What a prompt cache of this model holds: its cache after one token's forward pass."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([[0]]), cache=cache))
    arrays: dict[str, tuple[str, tuple[int | None, ...]]] = {}
    scalars: dict[str, type] = {}
    for key, leaf in tree_flatten([c.state for c in cache]):
        if isinstance(leaf, mx.array):
            shape: list[int | None] = list(leaf.shape)
            if type(cache[int(key.split(".")[0])]).__name__.endswith("KVCache") and len(shape) >= 3:
                shape[-2] = None  # (batch, heads, tokens, head dim): the tokens axis is the entry's length
            arrays[key] = (code_of(leaf.dtype), tuple(shape))
        else:
            scalars[key] = type(leaf)
    return Layout(tuple(type(c).__name__ for c in cache), arrays, scalars)


def code_of(dtype: Any) -> str:
    name = str(dtype).rsplit(".", 1)[-1]
    return _CODES.get(name, name)


def checksum(arrays: dict[str, Any]) -> str:
    """sha256 over every array's key, dtype, shape and bytes (each C-contiguous), in key order."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = arrays[key]
        h.update(f"{key}|{code_of(a.dtype)}|{list(a.shape)}|".encode())
        h.update(memoryview(a))
    return h.hexdigest()


def _brief(names: Any) -> str:
    names = list(names)
    return str(sorted(set(names))) if len(set(names)) <= 3 else f"{len(names)} layers"


def _shape(shape: tuple) -> str:
    return "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"


@dataclass
class Prepared:
    """An entry as it will be written: every leaf an evaluated, C-contiguous array (save_prompt_cache's
    conversion of ints, strings and None), so the writer thread only hashes and copies bytes."""

    arrays: dict[str, Any]
    classes: list[str]
    scalars: list  # [""] + [(key, "scalar" | "string" | "none")], as save_prompt_cache records them


def prepare(cache: list) -> Prepared:
    """On the main thread (it runs mlx): the arrays of `cache`, evaluated and contiguous."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    arrays: dict[str, Any] = {}
    scalars: list = [""]  # non-empty, or tree_flatten would drop it
    for key, leaf in tree_flatten([c.state for c in cache]):
        if isinstance(leaf, mx.array):
            arrays[key] = leaf
        elif isinstance(leaf, (bool, int, float)):
            arrays[key], kind = mx.array(leaf), "scalar"
            scalars.append((key, kind))
        elif isinstance(leaf, str):
            arrays[key] = mx.array([ord(ch) for ch in leaf])
            scalars.append((key, "string"))
        elif leaf is None:
            arrays[key] = mx.array([])
            scalars.append((key, "none"))
        else:
            raise ValueError(f"cache state is not serializable: {type(leaf).__name__}")
    for i, c in enumerate(cache):  # a KV cache's buffer runs past its offset: only the offset is kept
        if type(c).__name__ == "KVCache" and c.keys is not None and c.keys.shape[-2] > c.offset:
            arrays[f"{i}.0"], arrays[f"{i}.1"] = c.keys[..., :c.offset, :], c.values[..., :c.offset, :]
    mx.eval(list(arrays.values()))
    loose = {k: mx.contiguous(a) for k, a in arrays.items() if not memoryview(a).c_contiguous}
    if loose:
        mx.eval(list(loose.values()))
        arrays.update(loose)
    return Prepared(arrays, [type(c).__name__ for c in cache], scalars)


def write(f: BinaryIO, entry: Prepared, metadata: dict[str, str]) -> float:
    """The file save_prompt_cache would write, with the arrays' checksum in its metadata; the seconds
    the checksum took."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    start = time.monotonic()
    metadata = {**metadata, "checksum": checksum(entry.arrays)}
    hash_s = time.monotonic() - start
    mx.save_safetensors(f, entry.arrays, dict(tree_flatten([metadata, entry.classes, entry.scalars])))
    return hash_s


def check_header(header: dict[str, Any], layout: Layout) -> None:
    """The layout check, from the header alone (no tensor is read): Untrusted if it does not fit."""
    from mlx.utils import tree_unflatten

    _, classes, scalars = tree_unflatten(list((header.get("__metadata__") or {}).items()))
    kinds = dict(scalars[1:])
    arrays = {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__" and k not in kinds}
    layout.check(classes, arrays, set(kinds))


def load(f: BinaryIO, layout: Layout, length: int) -> tuple[list, dict[str, str], float]:
    """(the cache, our metadata, the seconds its checksum took) from an open file of an entry of
    `length` tokens; Untrusted if its checksum, its layout or its length is wrong."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten
    from mlx_lm.models import cache as caches

    arrays, flat_meta = mx.load(f, format="safetensors", return_metadata=True)
    mx.eval(list(arrays.values()))
    metadata, classes, scalars = tree_unflatten(list(flat_meta.items()))
    start = time.monotonic()
    digest = checksum(arrays)
    hash_s = time.monotonic() - start
    if digest != metadata.get("checksum"):
        raise Untrusted("checksum mismatch: the arrays are not what was stored")
    kinds = dict(scalars[1:])
    layout.check(classes, {k: (code_of(a.dtype), tuple(a.shape)) for k, a in arrays.items() if k not in kinds},
                 set(kinds))
    leaves: dict[str, Any] = dict(arrays)
    for key, kind in kinds.items():
        leaves[key] = _leaf(arrays[key], kind)
        if type(leaves[key]) is not layout.scalars[key]:
            raise Untrusted(f"{key} is {type(leaves[key]).__name__}, the model's cache has {layout.scalars[key].__name__}")
    states = tree_unflatten(list(leaves.items()))
    cache = [getattr(caches, name).from_state(state) for name, state in zip(classes, states)]
    for i, c in enumerate(cache):
        if type(c) is caches.KVCache and not c.offset == length <= c.keys.shape[-2]:
            raise Untrusted(f"layer {i} holds {c.offset} of {c.keys.shape[-2]} positions, the entry has {length} tokens")
    return cache, metadata, hash_s


def _leaf(a: Any, kind: str) -> Any:
    """A non-array leaf back from its array (load_prompt_cache's conversion)."""
    if kind == "scalar":
        return a.item()
    if kind == "string":
        return "".join(map(chr, a.tolist()))
    if kind == "none":
        return None
    raise Untrusted(f"unknown leaf kind {kind!r}")
