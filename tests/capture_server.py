"""A stand-in API server for capturing what a real client sends: records every request (method, path,
headers, JSON body) and answers with the smallest reply the client accepts, in the right API's shape
(Anthropic Messages, JSON or SSE; OpenAI Responses, SSE), so a client runs a plain, a tool-using, a
thinking and a compaction turn against it. With `upstream` it answers nothing itself: it forwards to
the gateway and records both sides, so a test sees what the gateway was sent and what it said. `summarize` turns the records into the field lists that
tests/captures/*.json hold: field names and enum values, never prompts, ids or secrets."""

from __future__ import annotations

import gzip
import http.client
import json
import os
import re
import subprocess
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
CLIENTS = REPO / "clients"
FINAL_TEXT = "All done."


@dataclass
class Record:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    status: int = 0  # proxied: the upstream's status and (the start of) its reply
    reply: str = ""


@dataclass
class Script:
    """What the next model turn does: call `tool` (name, input) unless a tool result came back."""

    tool: tuple[str, dict] | None = None
    thinking: str = "Let me think about this."
    final: str = FINAL_TEXT


class CaptureServer:
    """`with CaptureServer() as s:` listens on 127.0.0.1; s.url, s.records, s.script."""

    def __init__(self, upstream: str | None = None) -> None:
        self.upstream = upstream
        self.records: list[Record] = []
        self.script = Script()
        self._lock = threading.Lock()
        server = self

        class Handler(_Handler):
            owner = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> "CaptureServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def record(self, rec: Record) -> None:
        with self._lock:
            self.records.append(rec)


class _Handler(BaseHTTPRequestHandler):
    owner: CaptureServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # quiet: the records are the log
        pass

    def _body(self) -> tuple[bytes, Any]:
        n = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(n) if n else b""
        text = gzip.decompress(raw) if self.headers.get("content-encoding") == "gzip" else raw
        try:
            return raw, (json.loads(text) if text else None)
        except ValueError:
            return raw, {"<non-json>": len(text)}

    def _handle(self) -> None:
        path = self.path.split("?", 1)[0]
        raw, body = self._body()
        rec = Record(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        self.owner.record(rec)
        if self.owner.upstream:
            return self._forward(raw, rec)
        script = self.owner.script
        if path.endswith("/messages/count_tokens"):
            return self._json(200, {"input_tokens": 100})
        if path.endswith("/messages") and self.command == "POST":
            return self._anthropic(body or {}, script)
        if path.endswith("/responses") and self.command == "POST":
            return self._sse(_responses_events(body or {}, script))
        if path.endswith("/models"):
            return self._json(200, {"object": "list", "data": []})
        self._json(404, {"error": {"type": "not_found_error", "message": f"no {path} here"}})

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle

    def _forward(self, raw: bytes, rec: Record) -> None:
        """The whole upstream reply, then to the client: streams arrive at once, which no client minds."""
        up = urlsplit(self.owner.upstream)
        conn = http.client.HTTPConnection(up.hostname, up.port, timeout=300)
        hop = {"host", "content-length", "connection", "accept-encoding"}
        conn.request(self.command, self.path, body=raw or None,
                     headers={k: v for k, v in self.headers.items() if k.lower() not in hop})
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        rec.status, rec.reply = resp.status, data[:4000].decode(errors="replace")
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(k, v)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _anthropic(self, body: dict, script: Script) -> None:
        blocks = _anthropic_blocks(body, script)
        if body.get("stream"):
            return self._sse(_anthropic_events(body, blocks))
        stop = "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn"
        self._json(200, {"id": "msg_capture", "type": "message", "role": "assistant", "model": body.get("model"),
                         "content": blocks, "stop_reason": stop, "stop_sequence": None,
                         "usage": {"input_tokens": 100, "output_tokens": 10}})

    def _json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _sse(self, events: list[tuple[str, dict]]) -> None:
        data = "".join(f"event: {name}\ndata: {json.dumps(obj)}\n\n" for name, obj in events).encode()
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _tool_names(tools: Any) -> set[str]:
    return {t.get("name") or (t.get("function") or {}).get("name") for t in tools or [] if isinstance(t, dict)}


def _anthropic_blocks(body: dict, script: Script) -> list[dict]:
    """A tool_use when the script names a tool the request offers and no result came back yet."""
    last = (body.get("messages") or [{}])[-1]
    content = last.get("content") if isinstance(last.get("content"), list) else []
    answered = any(isinstance(b, dict) and b.get("type") == "tool_result" for b in content)
    blocks: list[dict] = []
    if (body.get("thinking") or {}).get("type") in ("enabled", "adaptive"):
        blocks.append({"type": "thinking", "thinking": script.thinking, "signature": "c2lnbmF0dXJl"})
    if script.tool and script.tool[0] in _tool_names(body.get("tools")) and not answered:
        blocks.append({"type": "tool_use", "id": "toolu_capture1", "name": script.tool[0], "input": script.tool[1]})
    else:
        blocks.append({"type": "text", "text": script.final})
    return blocks


def _anthropic_events(body: dict, blocks: list[dict]) -> list[tuple[str, dict]]:
    stop = "tool_use" if blocks[-1]["type"] == "tool_use" else "end_turn"
    events = [("message_start", {"type": "message_start", "message": {
        "id": "msg_capture", "type": "message", "role": "assistant", "model": body.get("model"), "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 100, "output_tokens": 1}}})]
    for i, block in enumerate(blocks):
        if block["type"] == "thinking":
            start = {"type": "thinking", "thinking": "", "signature": ""}
            deltas = [{"type": "thinking_delta", "thinking": block["thinking"]},
                      {"type": "signature_delta", "signature": block["signature"]}]
        elif block["type"] == "tool_use":
            start = {**block, "input": {}}
            deltas = [{"type": "input_json_delta", "partial_json": json.dumps(block["input"])}]
        else:
            start = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": block["text"]}]
        events.append(("content_block_start", {"type": "content_block_start", "index": i, "content_block": start}))
        events += [("content_block_delta", {"type": "content_block_delta", "index": i, "delta": d}) for d in deltas]
        events.append(("content_block_stop", {"type": "content_block_stop", "index": i}))
    events.append(("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                                     "usage": {"output_tokens": 10}}))
    events.append(("message_stop", {"type": "message_stop"}))
    return events


def _responses_items(body: dict, script: Script) -> list[dict]:
    """A function_call item until its output comes back, then a message; a reasoning item first when
    the request asks for reasoning effort."""
    items = body.get("input") if isinstance(body.get("input"), list) else []
    answered = any(isinstance(i, dict) and i.get("type") == "function_call_output" for i in items)
    out: list[dict] = []
    if (body.get("reasoning") or {}).get("effort") not in (None, "none"):
        out.append({"type": "reasoning", "id": "rs_capture1", "encrypted_content": None,
                    "summary": [{"type": "summary_text", "text": script.thinking}]})
    if script.tool and script.tool[0] in _tool_names(body.get("tools")) and not answered:
        out.append({"type": "function_call", "id": "fc_capture1", "call_id": "call_capture1",
                    "name": script.tool[0], "arguments": json.dumps(script.tool[1]), "status": "completed"})
    else:
        out.append({"type": "message", "id": "msg_capture1", "role": "assistant", "status": "completed",
                    "content": [{"type": "output_text", "text": script.final, "annotations": []}]})
    return out


def _item_events(i: int, item: dict) -> list[tuple[str, dict]]:
    added = {**item, "status": "in_progress"}
    deltas: list[tuple[str, dict]] = []
    if item["type"] == "message":
        added["content"] = []
        deltas = [("response.output_text.delta", {"type": "response.output_text.delta", "item_id": item["id"],
                                                  "output_index": i, "content_index": 0,
                                                  "delta": item["content"][0]["text"]})]
    elif item["type"] == "function_call":
        added["arguments"] = ""
        deltas = [("response.function_call_arguments.delta", {"type": "response.function_call_arguments.delta",
                                                              "item_id": item["id"], "output_index": i,
                                                              "delta": item["arguments"]})]
    return [("response.output_item.added", {"type": "response.output_item.added", "output_index": i, "item": added}),
            *deltas,
            ("response.output_item.done", {"type": "response.output_item.done", "output_index": i, "item": item})]


def _responses_events(body: dict, script: Script) -> list[tuple[str, dict]]:
    items = _responses_items(body, script)
    response = {"id": "resp_capture", "object": "response", "created_at": 0, "status": "in_progress",
                "model": body.get("model"), "output": []}
    done = {**response, "status": "completed", "output": items, "usage": {
        "input_tokens": 100, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 10,
        "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 110}}
    events = [("response.created", {"type": "response.created", "response": response})]
    for i, item in enumerate(items):
        events += _item_events(i, item)
    return events + [("response.completed", {"type": "response.completed", "response": done})]


# --- running the pinned clients ----------------------------------------------------------------------


def pinned_version(package: str) -> str:
    return json.loads((CLIENTS / "package.json").read_text())["dependencies"][package]


def client_binary(name: str) -> Path:
    """clients/node_modules/.bin/NAME, or a failure that says how to install it (never a skip)."""
    path = CLIENTS / "node_modules" / ".bin" / name
    if not path.exists():
        raise AssertionError(f"{path.relative_to(REPO)} is missing: run `make setup` (it runs `npm ci` in "
                             f"clients/, which needs node and npm)")
    return path


def _base_env(home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8",
            "TMPDIR": os.environ.get("TMPDIR", "/tmp"), "NO_COLOR": "1"}


def claude_env(home: Path, base_url: str, model: str, **extra: str) -> dict[str, str]:
    """Claude Code pointed at `base_url`, its config under `home`, no telemetry, updates or reports."""
    return {**_base_env(home), "ANTHROPIC_BASE_URL": base_url, "ANTHROPIC_API_KEY": "dummy",
            "ANTHROPIC_MODEL": model, "ANTHROPIC_SMALL_FAST_MODEL": model, "ANTHROPIC_DEFAULT_HAIKU_MODEL": model,
            "CLAUDE_CONFIG_DIR": str(home / ".claude"), "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "DISABLE_TELEMETRY": "1", "DISABLE_AUTOUPDATER": "1", "DISABLE_ERROR_REPORTING": "1", **extra}


def codex_env(home: Path, base_url: str, model: str, *settings: str, tables: str = "") -> dict[str, str]:
    """Codex with a custom provider speaking the Responses API at `base_url` (…/v1); `settings`:
    more top-level config.toml lines, `tables`: more tables."""
    codex_home = home / "codex"
    codex_home.mkdir(parents=True, exist_ok=True)
    lines = [f"model = {json.dumps(model)}", 'model_provider = "lmx"', "check_for_update_on_startup = false",
             *settings, "[analytics]", "enabled = false", "[model_providers.lmx]", 'name = "lmx-gateway"',
             f"base_url = {json.dumps(base_url)}", 'wire_api = "responses"', tables]
    (codex_home / "config.toml").write_text("\n".join(lines) + "\n")
    return {**_base_env(home), "CODEX_HOME": str(codex_home)}


def run_client(argv: list[str], cwd: Path, env: dict[str, str], timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout_s)


# --- summarizing ------------------------------------------------------------------------------------

SECRET_HEADERS = {"authorization", "x-api-key", "cookie", "proxy-authorization"}
VALUE_HEADERS = {"anthropic-beta", "anthropic-version"}
# Free text, ids and hashes: their paths are kept, their values never.
_NO_VALUES = re.compile(r"(^|\.)(id|call_id|tool_use_id|user_id|signature|prompt_cache_key|session_id|"
                        r"encrypted_content|text|thinking|content|description|instructions|system|"
                        r"arguments|output|partial_json)$")
# JSON Schemas: their keys are the tool's own parameter names, not the API's fields.
_SCHEMAS = re.compile(r"(^|\.)(input_schema|parameters|schema|input|metadata\.[^.]+)$")
_ENUM = re.compile(r"^[A-Za-z][A-Za-z0-9_.:-]{0,47}$")
_IDLIKE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}|[0-9a-f]{16}")


def _walk(value: Any, path: str, out: dict[str, set]) -> None:
    out.setdefault(path, set())
    if isinstance(value, dict):
        if _SCHEMAS.search(path):
            return
        for k, v in value.items():
            _walk(v, f"{path}.{k}" if path else str(k), out)
    elif isinstance(value, list):
        for v in value:
            _walk(v, f"{path}[]", out)
    elif isinstance(value, (bool, int, float)) and not _NO_VALUES.search(path.replace("[]", "")):
        if len(out[path]) < 8:
            out[path].add(json.dumps(value))
    elif isinstance(value, str) and not _NO_VALUES.search(path.replace("[]", "")):
        if _ENUM.match(value) and not _IDLIKE.search(value) and len(out[path]) < 64:
            out[path].add(value)


def endpoint(rec: Record) -> str:
    return f"{rec.method} {rec.path.split('?', 1)[0]}"


def summarize(records: list[Record], scrub: tuple[str, ...] = ()) -> dict:
    """Per endpoint: header names (values for anthropic-beta/-version only), body field paths with the
    enum-like values seen. `scrub`: strings (temp dirs, cwd) that must not appear in what is kept."""
    out: dict[str, dict] = {}
    for rec in records:
        ep = out.setdefault(endpoint(rec), {"requests": 0, "query": set(), "headers": {}, "fields": {}})
        ep["requests"] += 1
        query = rec.path.split("?", 1)[1] if "?" in rec.path else ""
        ep["query"].update(kv.split("=", 1)[0] for kv in query.split("&") if kv)
        for name, value in rec.headers.items():
            values = ep["headers"].setdefault(name, set())
            if name in VALUE_HEADERS and name not in SECRET_HEADERS:
                values.update(v.strip() for v in value.split(","))
        if rec.body is not None:
            _walk(rec.body, "", ep["fields"])
    for ep in out.values():
        ep["query"] = sorted(ep["query"])
        ep["headers"] = {k: sorted(v) for k, v in sorted(ep["headers"].items())}
        # A list's items go with the list: "include" holds what "include[]" saw.
        fields: dict[str, set] = {}
        for k, v in ep["fields"].items():
            fields.setdefault(k.removesuffix("[]"), set()).update(v)
        ep["fields"] = {k: sorted(v) for k, v in sorted(fields.items()) if k}
    text = json.dumps(out)
    leaked = [s for s in scrub if s and s in text]
    assert not leaked, f"capture would keep {leaked}"
    return out
