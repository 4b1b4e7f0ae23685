"""Claude Code, real and unmodified (clients/package.json's pin), against a real lmx-gateway over a
real supervisor: `claude -p` reads a file with its own Read tool and prints the model's final answer,
in `--output-format json` and `stream-json`. The model writes a fixed script (tests/scripted_worker.py)
in the Qwen tool-call format: turn 1 calls Read on a file in a temp dir, and once the last message is
the tool's result, the final text. A recording proxy (tests/capture_server.py) between the CLI and
the gateway shows that the file's content went back to the model as the tool's result. Claude Code's
default request, whole, is accepted, and one past the model's context is refused in the words its
compaction logic looks for."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.capture_server import CaptureServer, claude_env, client_binary, run_client
from tests.client_stack import explain, served
from tests.harness import RunningSupervisor
from tests.snapshots import write_tiny_llama
from tests.test_agent_wire import _scripted
from tests.test_gateway import GatewayProcess

pytestmark = pytest.mark.timeout(300)

NOTE = "The secret word is pelican."
FINAL = "The note says the secret word is pelican."
# Claude Code's default system prompt and twelve tools are ~50,000 characters, and the tiny snapshot's
# 512-token vocabulary writes about one character a token: a 52,000-token prefill takes minutes on a
# CPU. The user's own switches cut it to ~4,000 (`--tools Read`: the one tool the turn uses;
# `--system-prompt`: a short one), which the snapshot and the model's KV budget are sized for. What
# the default prompt sends is covered field by field by tests/test_client_captures.py.
SLIM = ("--tools", "Read", "--system-prompt", "You are a coding agent. Use the Read tool to read files.")
CONTEXT_TOKENS = 16_384
TURN_TIMEOUT_S = 120


class Stack:
    def __init__(self, root: Path) -> None:
        self.work = root / "work"
        self.work.mkdir()
        self.note = self.work / "notes.txt"
        self.note.write_text(NOTE + "\n")
        model = write_tiny_llama(root / "model", agent=True, shape={"max_position_embeddings": CONTEXT_TOKENS})
        call = json.dumps({"name": "Read", "arguments": {"file_path": str(self.note)}})
        self.sup = RunningSupervisor(root / "sup", [_scripted(
            "coder", model, f"I will read the note.</think>\n\n<tool_call>\n{call}\n</tool_call>",
            after_tool=f"I have read it.</think>\n\n{FINAL}", context_tokens=CONTEXT_TOKENS)])
        self.root = root
        self.gateway: GatewayProcess | None = None

    def claude(self, base_url: str, *args: str, slim: bool = True) -> tuple[object, float]:
        env = claude_env(self.root / "home", base_url, "coder")
        argv = [str(client_binary("claude")), "-p", "What does notes.txt say? Read it.", "--allowedTools", "Read",
                *(SLIM if slim else ()), *args]
        start = time.monotonic()
        proc = run_client(argv, self.work, env, TURN_TIMEOUT_S)
        return proc, time.monotonic() - start


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    client_binary("claude")  # fails, saying `make setup`, before a supervisor starts
    yield from served(Stack(tmp_path_factory.mktemp("claude-code")))


def test_claude_p_json_reads_a_file_with_its_read_tool_and_prints_the_answer(stack: Stack) -> None:
    proc, took_s = stack.claude(stack.gateway.url, "--output-format", "json")
    assert proc.returncode == 0, explain(proc, stack.gateway)
    result = json.loads(proc.stdout)
    assert result["is_error"] is False and result["subtype"] == "success", result
    assert result["result"].strip() == FINAL
    assert result["num_turns"] == 2  # the Read call, then the answer
    print(f"claude -p (json): {took_s:.1f} s")


def test_claude_p_stream_json_sends_the_files_content_back_as_the_tool_result(stack: Stack) -> None:
    with CaptureServer(upstream=stack.gateway.url) as proxy:
        proc, took_s = stack.claude(proxy.url, "--output-format", "stream-json", "--verbose")
    assert proc.returncode == 0, explain(proc, stack.gateway)
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    uses = [b for e in events if e["type"] == "assistant" for b in e["message"]["content"] if b["type"] == "tool_use"]
    assert [(u["name"], u["input"]) for u in uses] == [("Read", {"file_path": str(stack.note)})]
    (result,) = [e for e in events if e["type"] == "result"]
    assert result["is_error"] is False and result["result"].strip() == FINAL
    turns = [r for r in proxy.records if r.path.split("?")[0] == "/v1/messages"]
    assert [r.status for r in turns] == [200, 200], [(r.status, r.reply[:500]) for r in turns]
    last = turns[1].body["messages"][-1]["content"]
    results = [b for b in last if b["type"] == "tool_result"]
    assert len(results) == 1 and results[0]["tool_use_id"] == uses[0]["id"]
    assert NOTE in json.dumps(results[0]["content"])
    # The model's thinking came back as a signed block, and went back to the gateway with the call.
    sent_back = turns[1].body["messages"][-2]["content"]
    (thought,) = [b for b in sent_back if b["type"] == "thinking"]
    assert thought["thinking"].strip() == "I will read the note." and thought["signature"]
    print(f"claude -p (stream-json): {took_s:.1f} s")


def test_claude_codes_default_request_is_accepted_and_one_past_the_context_is_prompt_too_long(stack: Stack) -> None:
    # Every field of the default request passes the gateway's checks (a refused one would be its own
    # 400); the ~30,000-token prompt then meets the model's 16,384 and is refused before prefill.
    with CaptureServer(upstream=stack.gateway.url) as proxy:
        proc, took_s = stack.claude(proxy.url, "--output-format", "json", slim=False)
    (turn,) = [r for r in proxy.records if r.path.split("?")[0] == "/v1/messages"]
    assert turn.status == 400, turn.reply[:500]
    error = json.loads(turn.reply)["error"]
    assert error["type"] == "invalid_request_error"
    assert re.fullmatch(rf"prompt is too long: \d+ tokens > {CONTEXT_TOKENS} maximum", error["message"]), error
    assert proc.returncode == 1, explain(proc, stack.gateway)
    result = json.loads(proc.stdout)
    assert result["is_error"] is True and result["terminal_reason"] == "prompt_too_long", result
    assert took_s < 30
