"""SupervisorClient: the asyncio-first client library of the supervisor (generate with streaming,
cancel and deadlines, status, load/unload, history, events, the operator's calls), each verb one
typed request on a protocol.connection.Connection. Every call has a deadline and a lost supervisor is
a typed error, not a hang. The blocking facade, SyncSupervisorClient, is in protocol.syncclient."""

from __future__ import annotations

import asyncio
import os
from typing import Any, Callable

from protocol import embed as embedding
from protocol import endpoint as ep
from protocol import errors as E
from protocol import keys
from protocol import rerank as reranking
from protocol.adminclient import AdminCalls
from protocol.connection import Connection, new_id
from protocol.eventstream import EventStream
from protocol.genstream import GenerateStream, Result
from protocol.messages import (
    Ack, Chunk, CountTokens, EmbedRequest, Embeddings, GenerateRequest, HistoryReply, HistoryRequest, LoadRequest, Message, StatusReply,
    StatusRequest, TokenCount, UnloadRequest,
)

__all__ = ["SupervisorClient", "GenerateStream", "EventStream", "Result", "Chunk", "EmbedResult", "RerankResult"]
EmbedResult = embedding.EmbedResult
RerankResult = reranking.RerankResult

# wait_state re-reads the status this often when no state event came: a subscriber that fell behind
# loses events (PUB/SUB), and this bounds what such a loss costs. A tcp endpoint has no events
# socket to follow: there it reads the status every STATE_POLL_S.
STATE_RECHECK_S = 1.0
STATE_POLL_S = 0.2


class SupervisorClient(AdminCalls):
    """The supervisor's verbs over one Connection (`self.connection`), which multiplexes any number
    of concurrent requests by request id and keeps each error with its own request."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        state_dir: str | os.PathLike | None = None,
        timeout_s: float = 300.0,
        connect_timeout_s: float = 3.0,
        events_endpoint: str | None = None,
        curve_server_key: str | bytes | None = None,
        curve_public_key: str | bytes | None = None,
        curve_secret_key: str | bytes | None = None,
        client_cert: str | os.PathLike | None = None,
        server_key_file: str | os.PathLike | None = None,
    ) -> None:
        """A tcp:// endpoint takes CURVE keys: the server's public key and this client's keypair,
        as z85 text (curve_*) or as files (`server_key_file`: the server's .key, `client_cert`:
        this client's .key_secret, from `lmxctl keys new`)."""
        self.endpoint = endpoint or ep.control_endpoint(state_dir)
        self._curve = keys.client_keys(curve_server_key, curve_public_key, curve_secret_key, client_cert,
                                       server_key_file)
        if events_endpoint is None and self.endpoint.startswith("ipc://"):
            events_endpoint = f"ipc://{os.path.join(os.path.dirname(self.endpoint[6:]), ep.EVENTS_SOCKET)}"
        self.events_endpoint = events_endpoint
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.connection = Connection(self.endpoint, curve=self._curve, connect_timeout_s=connect_timeout_s)

    async def connect(self) -> None:
        await self.connection.connect()

    async def close(self) -> None:
        await self.connection.close()

    async def __aenter__(self) -> "SupervisorClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def _request(self, msg: Message, timeout_s: float | None) -> Message:
        return await self.connection.call(msg, timeout_s or self.timeout_s)

    # --- API -----------------------------------------------------------------------------------

    async def status(self, timeout_s: float = 10.0) -> dict[str, Any]:
        reply = await self._request(StatusRequest(new_id()), timeout_s)
        assert isinstance(reply, StatusReply)
        return {"supervisor": reply.supervisor, "models": reply.models}

    def generate(
        self,
        model: str,
        prompt: str | None = None,
        *,
        messages: list[dict] | None = None,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        timeout_s: float | None = None,
        thinking_budget: int | None = None,
        parallel_tool_calls: bool = True,
        **agent: Any,
    ) -> GenerateStream:
        """Stream a generation. The deadline covers the whole request and travels to the supervisor.
        thinking_budget: at most this many thinking tokens, then the model closes its think block;
        parallel_tool_calls=False: at most one tool call (both left off the wire unless set)."""
        t = timeout_s or self.timeout_s
        # agent: tools, tool_choice, tool_name, response_format, logprobs, top_logprobs,
        # chat_template_kwargs, top_k (GenerateRequest); an unknown name is a TypeError here, not on the wire.
        req = GenerateRequest(new_id(), model, prompt, messages, max_tokens, temperature, top_p,
                              seed, list(stop or []), t, thinking_budget=thinking_budget,
                              parallel_tool_calls=parallel_tool_calls, **agent)
        return GenerateStream(self.connection, req, t)

    async def count_tokens(self, model: str, *, prompt: str | None = None, messages: list[dict] | None = None,
                           tools: list[dict] | None = None, tool_choice: str | None = None,
                           chat_template_kwargs: dict | None = None, timeout_s: float | None = None) -> int:
        """How many tokens a generation with these fields would have as its prompt (the model's own
        tokenizer and chat template, tools included), counted by its worker without generating."""
        t = timeout_s or min(self.timeout_s, 30.0)
        req = CountTokens(new_id(), model, prompt, messages, tools, tool_choice, chat_template_kwargs, t)
        reply = await self._request(req, t)
        assert isinstance(reply, TokenCount)
        return reply.prompt_tokens

    async def embed(self, model: str, inputs: list[str] | list[list[int]], dimensions: int | None = None,
                    timeout_s: float | None = None) -> embedding.EmbedResult:
        """The vectors of `inputs` (strings, or token arrays) from embed model `model`, each
        normalised as its pooling config says, truncated to `dimensions` (and re-normalised) if
        given. Out-of-bounds inputs (protocol.limits) are BadRequest here, before the wire."""
        t = timeout_s or min(self.timeout_s, 120.0)
        reply = await self._request(EmbedRequest(new_id(), model, list(inputs), dimensions, t), t)
        assert isinstance(reply, Embeddings)
        return embedding.result(reply)

    async def rerank(self, model: str, query: str, documents: list[str],
                     timeout_s: float | None = None) -> reranking.RerankResult:
        """A relevance score of each of `documents` to `query` from rerank model `model`: its raw
        logit (higher is more relevant; no sigmoid), in the documents' order, and which pairs were
        cut to the model's position limit. Out-of-bounds inputs are BadRequest here, before the wire."""
        t = timeout_s or min(self.timeout_s, 120.0)
        reply = await self._request(reranking.RerankRequest(new_id(), model, query, list(documents), t), t)
        assert isinstance(reply, reranking.RerankScores)
        return reranking.RerankResult.of(reply)

    async def complete(self, model: str, prompt: str | None = None, **kwargs: Any) -> Result:
        async with self.generate(model, prompt, **kwargs) as stream:
            return await stream.collect()

    async def load(self, model: str, force: bool = False, timeout_s: float = 10.0) -> dict:
        reply = await self._request(LoadRequest(new_id(), model, force), timeout_s)
        assert isinstance(reply, Ack)
        return reply.detail

    async def unload(self, model: str, timeout_s: float = 120.0) -> dict:
        reply = await self._request(UnloadRequest(new_id(), model), timeout_s)
        assert isinstance(reply, Ack)
        return reply.detail


    async def history(self, model: str, limit: int = 50, timeout_s: float = 10.0) -> list[dict]:
        """Crash records of `model`, newest first."""
        reply = await self._request(HistoryRequest(new_id(), model, limit), timeout_s)
        assert isinstance(reply, HistoryReply)
        return reply.records

    def events(self, *prefixes: str) -> EventStream:
        """Follow lifecycle events whose name starts with one of `prefixes` (default: all)."""
        if not self.events_endpoint:
            raise E.BadRequest("no events endpoint: pass events_endpoint= with a tcp:// control endpoint")
        return EventStream(self.events_endpoint, prefixes)

    # --- waiting for a state -------------------------------------------------------------------

    async def wait_state(self, model: str, predicate: Callable[[dict], Any], timeout_s: float,
                         recheck_s: float = STATE_RECHECK_S) -> dict:
        """Wait until `predicate(m)` holds for `m`, model `model`'s entry in the status, and return
        that entry. The entry is read once the model.state events are subscribed to (so a state
        already reached returns at once, and one reached meanwhile is not missed), then again on
        each of the model's state events, and `recheck_s` after the last read without one (what
        changes with no state change, active requests or cache figures, is seen that late).
        `predicate` sees every entry read, in order. Fails with RequestTimeout (naming the model and
        its last state) at the deadline, UnknownModel when the supervisor has no such model,
        SupervisorUnavailable when it goes away."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        if not self.events_endpoint:
            return await self._poll_state(model, predicate, deadline, timeout_s)
        async with self.events("model.state") as events:
            await events.connected(max(0.1, min(timeout_s, self.connect_timeout_s)))
            while True:
                m = await self._entry(model)
                if predicate(m):
                    return m
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise self._state_timeout(model, m, timeout_s)
                await _next_state_of(events, model, min(remaining, recheck_s))

    async def _poll_state(self, model: str, predicate: Callable[[dict], Any], deadline: float,
                          timeout_s: float) -> dict:
        loop = asyncio.get_running_loop()
        while True:
            m = await self._entry(model)
            if predicate(m):
                return m
            if loop.time() >= deadline:
                raise self._state_timeout(model, m, timeout_s)
            await asyncio.sleep(min(STATE_POLL_S, max(0.0, deadline - loop.time())))

    async def _entry(self, model: str) -> dict:
        found = [m for m in (await self.status())["models"] if m["id"] == model]
        if not found:
            raise E.UnknownModel(f"unknown model {model!r}", model=model)
        return found[0]

    @staticmethod
    def _state_timeout(model: str, m: dict, timeout_s: float) -> E.LmxError:
        return E.RequestTimeout(f"{model}: not in the awaited state within {timeout_s}s (it is {m['state']})",
                                model=model, state=m["state"])


async def _next_state_of(events: EventStream, model: str, timeout_s: float) -> None:
    """Return on the next model.state event of `model`, or after `timeout_s` without one."""
    try:
        async with asyncio.timeout(timeout_s):
            async for event in events:
                if event.get("model") == model:
                    return
    except TimeoutError:
        return
