"""Re-capture what the pinned agent CLIs send (clients/package.json): runs Claude Code and Codex,
real and unmodified, against tests/capture_server.py through a plain, a tool-using, a thinking and
(Claude Code) a compaction turn, and writes tests/captures/<client>-<version>.json: per endpoint the
header names, the values of anthropic-beta/-version, every body field path and its enum values.
Run after bumping a pin: `.venv/bin/python scripts/capture_clients.py` (needs `make setup`)."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.capture_server import (REPO, CaptureServer, Script, claude_env, client_binary, codex_env,  # noqa: E402
                                  pinned_version, run_client, summarize)

MODEL = "local-model"  # an id Claude Code does not know, as a local model's is
# Claude Code sends thinking.budget_tokens (MAX_THINKING_TOKENS) only for models it knows to take one.
BUDGET_MODEL = "claude-sonnet-4-5"
COMPACT_SUMMARY = "<analysis>A greeting.</analysis>\n<summary>The user said hello.</summary>"
NOTE = "The secret word is pelican.\n"


def _run(server: CaptureServer, argv: list[str], cwd: Path, env: dict, script: Script) -> dict:
    server.script = script
    first = len(server.records)
    proc = run_client(argv, cwd, env)
    if proc.returncode != 0:
        raise SystemExit(f"{argv[0]} {argv[1:3]} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return {"requests": len(server.records) - first}


def capture_claude(server: CaptureServer, root: Path) -> dict:
    claude, work = str(client_binary("claude")), root / "work"
    home, env = root / "home", claude_env(root / "home", server.url, MODEL)
    read = Script(tool=("Read", {"file_path": str(work / "notes.txt")}))
    scenarios = {
        "plain (-p, json)": ([claude, "-p", "Say hello", "--output-format", "json"], env, Script()),
        "tool (Read, stream-json)": ([claude, "-p", "What does notes.txt say?", "--output-format", "stream-json",
                                      "--verbose", "--allowedTools", "Read"], env, read),
        "thinking (MAX_THINKING_TOKENS, a model taking budget_tokens)": (
            [claude, "-p", "Think, then read notes.txt", "--output-format", "json", "--allowedTools", "Read"],
            claude_env(home, server.url, BUDGET_MODEL, MAX_THINKING_TOKENS="1024"), read),
        "compaction (--continue /compact)": ([claude, "-p", "--continue", "/compact", "--output-format", "json"],
                                             env, Script(final=COMPACT_SUMMARY)),
    }
    return {name: _run(server, argv, work, e, s) for name, (argv, e, s) in scenarios.items()}


def capture_codex(server: CaptureServer, root: Path) -> dict:
    codex, work = str(client_binary("codex")), root / "work"
    url = f"{server.url}/v1"
    exec_ = [codex, "exec", "--skip-git-repo-check"]
    cat = Script(tool=("exec_command", {"cmd": "cat notes.txt"}))
    scenarios = {
        "plain (exec)": ([*exec_, "Say hello"], codex_env(root / "home", url, MODEL), Script()),
        "tool (exec_command)": ([*exec_, "What does notes.txt say?"], codex_env(root / "home", url, MODEL), cat),
        "second turn (exec resume --last)": ([*exec_, "resume", "--last", "And now?"],
                                             codex_env(root / "home", url, MODEL), Script()),
        "reasoning (model_reasoning_effort high)": (
            [*exec_, "Think, then read notes.txt"], codex_env(root / "home-r", url, MODEL, 'model_reasoning_effort = "high"'), cat),
    }
    return {name: _run(server, argv, work, e, s) for name, (argv, e, s) in scenarios.items()}


def capture(client: str, package: str, run) -> Path:  # type: ignore[no-untyped-def]
    version = pinned_version(package)
    with tempfile.TemporaryDirectory(prefix="lmx-capture-") as tmp, CaptureServer() as server:
        root = Path(tmp).resolve()
        (root / "work").mkdir()
        (root / "work" / "notes.txt").write_text(NOTE)
        scenarios = run(server, root)
        endpoints = summarize(server.records, scrub=(tmp, str(root), str(REPO)))
    out = REPO / "tests" / "captures" / f"{client}-{version}.json"
    out.write_text(json.dumps({"client": package, "version": version, "model": MODEL,
                               "scenarios": scenarios, "endpoints": endpoints}, indent=1) + "\n")
    return out


def main() -> int:
    for client, package, run in (("claude-code", "@anthropic-ai/claude-code", capture_claude),
                                 ("codex", "@openai/codex", capture_codex)):
        path = capture(client, package, run)
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
