"""Codex CLI, real and unmodified (clients/package.json's pin), against a real lmx-gateway's Responses
API (a custom provider, `wire_api = "responses"`) over a real supervisor: `codex exec` runs the shell
command the model calls with its exec_command tool, sends the output back as function_call_output,
and prints the model's final answer. The model writes a fixed script (tests/scripted_worker.py) in
the Qwen tool-call format; a recording proxy (tests/capture_server.py) shows what went back. Codex's
default request, whole, is accepted, and one past the model's context is refused with the code Codex
reads as "out of room in the context window"."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.capture_server import CaptureServer, client_binary, codex_env, run_client
from tests.client_stack import explain, served
from tests.harness import RunningSupervisor
from tests.snapshots import write_tiny_llama
from tests.test_agent_wire import _scripted
from tests.test_gateway import GatewayProcess

pytestmark = pytest.mark.timeout(300)

NOTE = "The secret word is pelican."
FINAL = "The note says the secret word is pelican."
CALL = {"name": "exec_command", "arguments": {"cmd": "cat notes.txt"}}  # Codex's shell tool, as captured
# Codex's default instructions and tools are ~40,000 characters, and the tiny snapshot's 512-token
# vocabulary writes about one character a token: minutes of prefill on a CPU. The user's own settings
# cut it to ~7,000 (short instructions; no sub-agent, goal or web-search tools), which the snapshot and
# the model's KV budget are sized for. tests/test_client_captures.py covers the default request.
SLIM_TABLES = "[features]\ngoals = false\n[agents]\nenabled = false\n"
INSTRUCTIONS = "You are a coding agent. Run shell commands with the exec_command tool.\n"
CONTEXT_TOKENS = 16_384
TURN_TIMEOUT_S = 120
# The command only reads a file in a temp dir. Codex's Linux sandbox (bubblewrap) needs unprivileged
# user namespaces, which many CI containers refuse (Docker's default seccomp, Ubuntu 24.04's AppArmor),
# and what this test proves is the wire, not the sandbox: so no sandbox.
SANDBOX = ("--sandbox", "danger-full-access")


class Stack:
    def __init__(self, root: Path) -> None:
        self.root, self.work = root, root / "work"
        self.work.mkdir()
        (self.work / "notes.txt").write_text(NOTE + "\n")
        (root / "instructions.md").write_text(INSTRUCTIONS)
        model = write_tiny_llama(root / "model", agent=True, shape={"max_position_embeddings": CONTEXT_TOKENS})
        self.sup = RunningSupervisor(root / "sup", [_scripted(
            "coder", model, f"I will read the note.</think>\n\n<tool_call>\n{json.dumps(CALL)}\n</tool_call>",
            after_tool=f"I have read it.</think>\n\n{FINAL}", context_tokens=CONTEXT_TOKENS)])
        self.gateway: GatewayProcess | None = None

    def codex(self, base_url: str, *args: str, slim: bool = True) -> tuple[object, float]:
        settings = (f"model_instructions_file = {json.dumps(str(self.root / 'instructions.md'))}",
                    'web_search = "disabled"') if slim else ()
        env = codex_env(self.root / ("home" if slim else "home-default"), f"{base_url}/v1", "coder", *settings,
                        tables=SLIM_TABLES if slim else "")
        argv = [str(client_binary("codex")), "exec", "--skip-git-repo-check", *SANDBOX, *args,
                "What does notes.txt say? Read it."]
        start = time.monotonic()
        proc = run_client(argv, self.work, env, TURN_TIMEOUT_S)
        return proc, time.monotonic() - start


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    client_binary("codex")  # fails, saying `make setup`, before a supervisor starts
    yield from served(Stack(tmp_path_factory.mktemp("codex")))


def test_codex_exec_runs_the_called_command_and_prints_the_answer(stack: Stack) -> None:
    proc, took_s = stack.codex(stack.gateway.url)
    assert proc.returncode == 0, explain(proc, stack.gateway)
    assert proc.stdout.strip() == FINAL, explain(proc, stack.gateway)
    assert "cat notes.txt" in proc.stderr and NOTE in proc.stderr  # the transcript: the command and its output
    print(f"codex exec: {took_s:.1f} s")


def test_codex_exec_json_sends_the_commands_output_back_as_function_call_output(stack: Stack) -> None:
    with CaptureServer(upstream=stack.gateway.url) as proxy:
        proc, took_s = stack.codex(proxy.url, "--json")
    assert proc.returncode == 0, explain(proc, stack.gateway)
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    items = [e["item"] for e in events if e.get("type") == "item.completed"]
    (command,) = [i for i in items if i.get("type") == "command_execution"]
    assert "cat notes.txt" in command["command"] and NOTE in command["aggregated_output"]
    assert command["exit_code"] == 0
    # The "\n\n" the model writes after </think>, before its call, is no message of its own.
    assert [i["text"] for i in items if i.get("type") == "agent_message"] == [FINAL]
    turns = [r for r in proxy.records if r.path == "/v1/responses"]
    assert [r.status for r in turns] == [200, 200], [(r.status, r.reply[:500]) for r in turns]
    second = turns[1].body["input"]
    (call,) = [i for i in second if i.get("type") == "function_call"]
    assert call["name"] == "exec_command" and json.loads(call["arguments"]) == CALL["arguments"]
    (output,) = [i for i in second if i.get("type") == "function_call_output"]
    assert output["call_id"] == call["call_id"] and NOTE in output["output"]
    print(f"codex exec --json: {took_s:.1f} s")


def test_codexs_default_request_is_accepted_and_one_past_the_context_is_context_length_exceeded(stack: Stack) -> None:
    # Every field and tool type of the default request (namespace and web_search tools included) passes
    # the gateway's checks; the ~25,000-token prompt then meets the model's 16,384, refused before prefill.
    with CaptureServer(upstream=stack.gateway.url) as proxy:
        proc, took_s = stack.codex(proxy.url, "--json", slim=False)
    (turn,) = [r for r in proxy.records if r.path == "/v1/responses"]
    assert turn.status == 400, turn.reply[:500]
    error = json.loads(turn.reply)["error"]
    assert error["code"] == "context_length_exceeded" and error["type"] == "invalid_request_error", error
    assert proc.returncode == 1, explain(proc, stack.gateway)
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    (failed,) = [e for e in events if e.get("type") == "turn.failed"]
    assert "context window" in failed["error"]["message"], failed
    assert took_s < 30
