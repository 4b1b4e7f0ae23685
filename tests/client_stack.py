"""What tests/test_clients_claude_code.py and tests/test_clients_codex.py share: their module
stack's start and stop (a supervisor with the client's scripted model, one gateway in front), and
the failure text that shows the CLI's output beside the gateway's log."""

from __future__ import annotations

from typing import Any, Iterator

from tests.test_gateway import GatewayProcess


def served(stack: Any) -> Iterator[Any]:
    """A module fixture's body over a stack with `sup` (not started) and `root`: starts the
    supervisor and a gateway in front (`stack.gateway`), stops both after, the gateway's exit checked."""
    try:
        stack.sup.start()
        stack.gateway = GatewayProcess(stack.root / "gw", stack.sup.state_dir)
        yield stack
        assert stack.gateway.stop() == 0
    finally:
        stack.sup.cleanup()


def explain(proc: Any, gateway: GatewayProcess) -> str:
    return (f"exit {proc.returncode}\nstdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}\n"
            f"gateway: {gateway.stderr_path.read_text()[-2000:]}")
