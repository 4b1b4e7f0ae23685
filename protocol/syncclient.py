"""SyncSupervisorClient: the blocking facade over SupervisorClient (its own event loop on a private
thread). It imports the client, never the reverse: import it from here."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Iterator

from protocol.client import Chunk, Result, SupervisorClient


class SyncSupervisorClient:
    """Blocking facade over SupervisorClient: its own event loop on a private thread."""

    def __init__(self, endpoint: str | None = None, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="lmx-client", daemon=True)
        self._thread.start()
        self._client = SupervisorClient(endpoint, **kwargs)

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def status(self, **kw: Any) -> dict[str, Any]:
        return self._run(self._client.status(**kw))

    def load(self, model: str, **kw: Any) -> dict:
        return self._run(self._client.load(model, **kw))

    def unload(self, model: str, **kw: Any) -> dict:
        return self._run(self._client.unload(model, **kw))

    def history(self, model: str, **kw: Any) -> list[dict]:
        return self._run(self._client.history(model, **kw))

    def release(self, model: str, **kw: Any) -> dict:
        return self._run(self._client.release(model, **kw))

    def rollback(self, model: str, revision: str | None = None, **kw: Any) -> dict:
        return self._run(self._client.rollback(model, revision, **kw))

    def verify(self, model: str, **kw: Any) -> dict:
        return self._run(self._client.verify(model, **kw))

    def compat(self, **kw: Any) -> dict:
        return self._run(self._client.compat(**kw))

    def repair(self, model: str, **kw: Any) -> dict:
        return self._run(self._client.repair(model, **kw))

    def probe(self, path: str, **kw: Any) -> dict:
        return self._run(self._client.probe(path, **kw))

    def reload(self, **kw: Any) -> dict:
        return self._run(self._client.reload(**kw))

    def metrics(self, **kw: Any) -> str:
        return self._run(self._client.metrics(**kw))

    def clear_cache(self, model: str | None = None, **kw: Any) -> dict:
        return self._run(self._client.clear_cache(model, **kw))

    def swap(self, old: str, new: str, **kw: Any) -> dict:
        return self._run(self._client.swap(old, new, **kw))

    def wait_state(self, model: str, predicate: Any, timeout_s: float, **kw: Any) -> dict:
        return self._run(self._client.wait_state(model, predicate, timeout_s, **kw))

    def count_tokens(self, model: str, **kw: Any) -> int:
        return self._run(self._client.count_tokens(model, **kw))

    def embed(self, model: str, inputs: list, **kw: Any) -> Any:
        """SupervisorClient.embed: an EmbedResult."""
        return self._run(self._client.embed(model, inputs, **kw))

    def rerank(self, model: str, query: str, documents: list, **kw: Any) -> Any:
        """SupervisorClient.rerank: a RerankResult."""
        return self._run(self._client.rerank(model, query, documents, **kw))

    def complete(self, model: str, prompt: str | None = None, **kw: Any) -> Result:
        return self._run(self._client.complete(model, prompt, **kw))

    def generate(self, model: str, prompt: str | None = None, **kw: Any) -> Iterator[Chunk]:
        """Yields chunks; returns the Result as the generator's return value (StopIteration.value)."""
        stream = self._client.generate(model, prompt, **kw)

        async def step() -> Chunk | None:
            try:
                return await stream.__anext__()
            except StopAsyncIteration:
                return None

        try:
            while (chunk := self._run(step())) is not None:
                yield chunk
        finally:
            self._run(stream.aclose())
        return stream.result

    def close(self) -> None:
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def __enter__(self) -> "SyncSupervisorClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
