"""Test-only worker wrapper, named in a model's `worker_command`: runs the real worker with one fault
injected from outside the production code (a line on stderr, then a signal to itself)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--at", choices=["start", "load", "generate", "step", "never"], required=True)
parser.add_argument("--say", default=None, help="a line to print on stderr before dying")
parser.add_argument("--signal", default="SIGABRT")
parser.add_argument("--after", type=int, default=1, help="generate: calls that pass first (1 = the canary)")
parser.add_argument("--unless-exists", default=None, help="no fault once this file exists")
parser.add_argument("--stall-s", type=float, default=0.0, help="generate: sleep this long first (a slow canary)")
parser.add_argument("--rank", type=int, default=None, help="in a group, only this rank (MLX_RANK) faults")
parser.add_argument("--strand", default=None,
                    help="a tmpfs file to fill and map at start: memory that outlives the worker")
parser.add_argument("--strand-bytes", type=int, default=0)
args = parser.parse_args()

if args.strand:
    # Pages of a tmpfs file count in this process's RSS while mapped and stay in use after it dies,
    # as wired memory a hard-killed Metal process leaves behind does on macOS.
    import mmap

    fd = os.open(args.strand, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, args.strand_bytes)
    _stranded = mmap.mmap(fd, args.strand_bytes)
    for offset in range(0, args.strand_bytes, mmap.PAGESIZE):
        _stranded[offset] = 1


def fault() -> None:
    if args.stall_s:
        import time

        time.sleep(args.stall_s)
        return
    if args.unless_exists and Path(args.unless_exists).exists():
        return
    if args.rank is not None and os.environ.get("MLX_RANK") != str(args.rank):
        return
    if args.say:
        sys.stderr.write(args.say + "\n")
        sys.stderr.flush()
    os.kill(os.getpid(), getattr(signal, args.signal))


import worker.engine as engine  # noqa: E402,F401

if args.at == "start":
    fault()
elif args.at == "load":
    _load = engine.Engine.load

    def load(self, path):  # type: ignore[no-untyped-def]
        fault()
        return _load(self, path)

    engine.Engine.load = load
    import worker.group as group

    _group_load = group.load

    def group_load(*a, **kw):  # type: ignore[no-untyped-def]
        fault()
        return _group_load(*a, **kw)

    group.load = group_load
elif args.at == "generate":
    import worker.batch as batch

    _add = batch.Batcher.add
    calls = [0]

    def add(self, req):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] > args.after:
            fault()
        return _add(self, req)

    batch.Batcher.add = add
elif args.at == "step":
    # A generation that never returns from inside mlx-lm (a wedged kernel): its lone-request path
    # (generate_step) and the batch's (BatchGenerator.next) both block once `--after` requests passed.
    # Patched at the first request, not here: importing mlx-lm before the hello would delay it.
    import threading

    import worker.batch as batch

    _add = batch.Batcher.add
    calls = [0]

    def wedge() -> None:
        import importlib

        # The module, not the package's `generate` function of the same name.
        mlx_generate = importlib.import_module("mlx_lm.generate")

        _generate_step, _next = mlx_generate.generate_step, mlx_generate.BatchGenerator.next

        def generate_step(*a, **kw):  # type: ignore[no-untyped-def]
            if calls[0] > args.after:
                threading.Event().wait()
            yield from _generate_step(*a, **kw)

        def next_(self):  # type: ignore[no-untyped-def]
            if calls[0] > args.after:
                threading.Event().wait()
            return _next(self)

        mlx_generate.generate_step = generate_step
        mlx_generate.BatchGenerator.next = next_

    def add(self, req):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] == 1:
            wedge()
        return _add(self, req)

    batch.Batcher.add = add

from worker.main import main  # noqa: E402

raise SystemExit(main())
