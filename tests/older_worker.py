"""Test-only worker wrapper, named in a model's `worker_command`: the real worker, made to take
requests and cancels one way only, so a test sees which way the supervisor sends them.

- `--older`: like a worker from before `Hello.direct_requests` (one adopted across an upgrade of the
  supervisor): its hello leaves that field and `capabilities` out and its main thread never reads its
  own socket; requests reach it only through its IO thread.
- `--direct-only`: its IO thread drops requests and cancels; they reach it only on its main
  thread's socket, where its hello says to send them."""

from __future__ import annotations

import argparse
import dataclasses

import worker.channel as channel
import worker.main as worker_main
from protocol.messages import Cancel, GenerateRequest

parser = argparse.ArgumentParser()
way = parser.add_mutually_exclusive_group(required=True)
way.add_argument("--older", action="store_true")
way.add_argument("--direct-only", action="store_true")
args = parser.parse_args()

if args.older:
    _Hello = worker_main.Hello

    def _older_hello(*a, **kw):  # type: ignore[no-untyped-def]
        return dataclasses.replace(_Hello(*a, **kw), direct_requests=False, capabilities=[])

    worker_main.Hello = _older_hello  # type: ignore[misc,assignment]
    channel.Inbox._from_socket = lambda self: None  # type: ignore[method-assign]
else:
    _put = channel.Inbox.put

    def _put_no_requests(self, msg):  # type: ignore[no-untyped-def]
        if not isinstance(msg, (GenerateRequest, Cancel)):
            _put(self, msg)

    channel.Inbox.put = _put_no_requests  # type: ignore[method-assign]

raise SystemExit(worker_main.main())
