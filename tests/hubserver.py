"""A loopback HTTP server that serves a directory the way the Hugging Face hub's resolve URLs do
(`/{org}/{name}/resolve/{revision}/{file}`, HEAD with ETag / X-Repo-Commit / Content-Length, then GET),
so huggingface_hub itself is exercised against it without any network. It counts the GETs per file."""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class FakeHub:
    def __init__(self, repo: str, revision: str, files: Path) -> None:
        self.repo, self.revision, self.files = repo, revision, files
        self.gets: Counter[str] = Counter()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet test output
                pass

            def _file(self) -> Path | None:
                prefix = f"/{hub.repo}/resolve/{hub.revision}/"
                if not self.path.startswith(prefix):
                    return None
                name = self.path[len(prefix):].split("?")[0]
                p = hub.files / name
                return p if "/" not in name and p.is_file() else None

            def _headers(self, p: Path | None) -> bool:
                if p is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return False
                self.send_response(200)
                self.send_header("Content-Length", str(p.stat().st_size))
                self.send_header("ETag", f'"{hashlib.sha256(p.read_bytes()).hexdigest()}"')
                self.send_header("X-Repo-Commit", hub.revision)
                self.end_headers()
                return True

            def do_HEAD(self) -> None:
                self._headers(self._file())

            def do_GET(self) -> None:
                p = self._file()
                if self._headers(p):
                    hub.gets[p.name] += 1
                    self.wfile.write(p.read_bytes())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
