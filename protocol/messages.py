"""Typed message structs for both boundaries: client <-> supervisor and supervisor <-> worker."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

from protocol import admin as A
from protocol import peer as P
from protocol.admin import AdminRequest  # noqa: F401  (the legacy admin message; its schema's home)
from protocol.errors import BadRequest, LmxError
from protocol.rerank import RerankRequest, RerankScores  # noqa: F401  (their home: protocol/rerank.py)
# What a worker is given (Init, GenerateRequest) lives in protocol/work.py, below the peer link that
# nests both; the base and `added()` in protocol/wirebase.py, below protocol/admin.py. This stays
# the import path of all of them.
from protocol.wirebase import Message, added, nested  # noqa: F401
from protocol.work import GenerateRequest, Init  # noqa: F401


# --- shared by both boundaries -------------------------------------------------------------


@dataclass
class CountTokens(Message):
    """How many tokens a generation's prompt would be, from the same fields and the same rendering
    (chat template, tools), without generating. Answered with a TokenCount."""

    TAG: ClassVar[str] = "count_tokens"
    request_id: str
    model: str
    prompt: Optional[str] = None
    messages: Optional[list[dict]] = None
    tools: Optional[list[dict]] = None
    tool_choice: Optional[str] = None  # "none": the tools are not rendered, as in a generation
    chat_template_kwargs: Optional[dict] = None
    timeout_s: Optional[float] = None


@dataclass
class TokenCount(Message):
    TAG: ClassVar[str] = "token_count"
    request_id: str
    prompt_tokens: int


@dataclass
class Chunk(Message):
    """Streamed text; `tokens` is how many generated tokens this chunk carries. `reasoning` is
    thinking text (between the model's think markers, never in `text`), `tool_calls` the calls
    completed since the last chunk (OpenAI shape: id, type, function {name, arguments}), `logprobs`
    one entry per token when the request asked for them."""

    TAG: ClassVar[str] = "chunk"
    request_id: str
    text: str
    tokens: int = 1
    reasoning: str = added("")
    tool_calls: list[dict] = added(factory=list)
    logprobs: Optional[list[dict]] = added()

    def extras(self) -> dict:
        """What beside text and tokens is set (a Chunks item's fourth element)."""
        out: dict = {}
        if self.reasoning:
            out["reasoning"] = self.reasoning
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        if self.logprobs is not None:
            out["logprobs"] = self.logprobs
        return out


@dataclass
class Chunks(Message):
    """Worker -> supervisor: what one batch step produced, a chunk per stream, in one message:
    `items` = [[request_id, text, tokens], ...], or [request_id, text, tokens, extras] where a chunk
    has more (Chunk.extras). The supervisor hands each on as a Chunk."""

    TAG: ClassVar[str] = "chunks"
    items: list[list]

    def chunks(self) -> list[Chunk]:
        return [Chunk(item[0], item[1], item[2], **(item[3] if len(item) > 3 else {})) for item in self.items]


@dataclass
class Final(Message):
    """End of a generation. usage: prompt_tokens, completion_tokens, cached_tokens (the prompt's
    tokens whose KV came from the prefix cache, not prefilled); timings: seconds."""

    TAG: ClassVar[str] = "final"
    request_id: str
    text: str
    finish_reason: str  # "stop", "length", or "tool_calls" (it ended after calling tools)
    usage: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    reasoning: str = added("")  # the whole thinking text, apart from `text`
    tool_calls: list[dict] = added(factory=list)  # every call, parsed (OpenAI shape)
    logprobs: Optional[list[dict]] = added()  # every token's, when asked for
    stop_sequence: Optional[str] = added()  # which of `stop` ended it ("stop" from a stop string)


@dataclass
class Cancel(Message):
    TAG: ClassVar[str] = "cancel"
    request_id: str


@dataclass
class Error(Message):
    """A typed failure of one request (or of the connection when request_id is None)."""

    TAG: ClassVar[str] = "error"
    request_id: Optional[str]
    code: str
    message: str
    details: dict = field(default_factory=dict)

    @classmethod
    def from_exc(cls, request_id: Optional[str], exc: LmxError) -> "Error":
        return cls(request_id, exc.code.code, exc.message, dict(exc.details))

    def to_exc(self) -> LmxError:
        return LmxError.from_wire(self.code, self.message, self.details)


@dataclass
class EmbedRequest(Message):
    """Embed each of `inputs` (all strings, or all token arrays) with an embed model. `dimensions`:
    truncate each vector to this many (then re-normalise), where the model allows it. Answered
    with one Embeddings."""

    TAG: ClassVar[str] = "embed"
    request_id: str
    model: str
    inputs: Union[list[str], list[list[int]]]
    dimensions: Optional[int] = None
    timeout_s: Optional[float] = None


@dataclass
class Embeddings(Message):
    """The vectors of an EmbedRequest, in its inputs' order: one little-endian float32 buffer of
    len(inputs) x dims (msgpack bin, not float lists: a tenth of the bytes and no per-float
    decoding), each vector normalised as the model's pooling config says. protocol.embed reads it."""

    TAG: ClassVar[str] = "embeddings"
    request_id: str
    dims: int
    data: bytes
    prompt_tokens: int


# --- client <-> supervisor -----------------------------------------------------------------


@dataclass
class StatusRequest(Message):
    TAG: ClassVar[str] = "status"
    request_id: str


@dataclass
class StatusReply(Message):
    TAG: ClassVar[str] = "status_reply"
    request_id: str
    supervisor: dict
    models: list[dict]


@dataclass
class LoadRequest(Message):
    TAG: ClassVar[str] = "load"
    request_id: str
    model: str
    force: bool = False  # try even when the compatibility registry knows this model x backend failed


@dataclass
class UnloadRequest(Message):
    TAG: ClassVar[str] = "unload"
    request_id: str
    model: str


@dataclass
class Ack(Message):
    """Success of an admin op; `detail` says what happened (e.g. the model's new state)."""

    TAG: ClassVar[str] = "ack"
    request_id: str
    detail: dict = field(default_factory=dict)


@dataclass
class HistoryRequest(Message):
    TAG: ClassVar[str] = "history"
    request_id: str
    model: str
    limit: int = 50


@dataclass
class HistoryReply(Message):
    """Crash records, newest first."""

    TAG: ClassVar[str] = "history_reply"
    request_id: str
    model: str
    records: list[dict]


# --- supervisor <-> worker -----------------------------------------------------------------


@dataclass
class Hello(Message):
    """Worker -> supervisor, first message: who it is (token proves it was spawned by us)."""

    TAG: ClassVar[str] = "hello"
    token: str
    pid: int
    model_id: str
    versions: dict = field(default_factory=dict)
    # Set by an orphaned worker asking a new supervisor to adopt it: the revision it has loaded
    # (None: it never finished loading) and its process start time (pid reuse cannot fake both).
    adopt: bool = False
    revision: Optional[str] = None
    start_time: Optional[float] = None
    # Its main thread reads generate requests and cancels on its own socket (endpoint's data
    # identity): send them there. A worker from before this field gets them on its IO thread's.
    direct_requests: bool = False
    # The message tags beyond the first handshake-era set that it serves (e.g. "count_tokens"): a
    # worker from before a message is refused it by the supervisor, never left to drop it.
    capabilities: list[str] = added(factory=list)


# How far two readings of one process's start time may differ and still name that process. On
# Linux a start time is boot ticks plus /proc/stat's btime, which the kernel recomputes on every read
# (wall clock minus uptime, in whole seconds), so two processes reading one start time can differ by
# a second; an exact match refused adoption at random. pid reuse with a start within two seconds
# is not a case; a reboot moves it by far more.
START_TIME_SLACK_S = 2.0


@dataclass
class Adopt(Message):
    """Supervisor -> orphaned worker: you are ours again; watch this supervisor process from now on."""

    TAG: ClassVar[str] = "adopt"
    supervisor_pid: int
    supervisor_start_time: float


@dataclass
class ClearPrefixCache(Message):
    """Supervisor -> worker: forget every prefix cache entry, in memory and on disk (lmxctl cache
    clear). A worker from before this message logs it as unreadable and keeps its entries."""

    TAG: ClassVar[str] = "clear_prefix_cache"


@dataclass
class Ready(Message):
    """Worker -> supervisor: weights loaded for `revision`; the worker can generate."""

    TAG: ClassVar[str] = "ready"
    revision: str
    load_s: float
    memory: dict = field(default_factory=dict)
    # The prefix cache's figures at READY (empty when it is off): status has them from READY on,
    # not only from the first heartbeat.
    cache: dict = added(factory=dict)


@dataclass
class Heartbeat(Message):
    """Worker -> supervisor. `progress` grows with every prefill chunk and token: stuck vs dead."""

    TAG: ClassVar[str] = "heartbeat"
    progress: int
    phase: str  # a protocol.phase.Phase value
    memory: dict = field(default_factory=dict)
    # The prefix cache's figures (worker.prefixcache.PrefixCache.stats); empty when it is off.
    cache: dict = added(factory=dict)


@dataclass
class Shutdown(Message):
    TAG: ClassVar[str] = "shutdown"
    reason: str = ""


# --- validation ----------------------------------------------------------------------------

_NONE = type(None)


def _check(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        return any(_check(value, arg) for arg in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_check(v, item) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is _NONE:
        return value is None
    return isinstance(value, hint)


_HINTS: dict[type, dict[str, Any]] = {}


def from_wire(cls: type[Message], data: Any, within: str = "") -> Message:
    """Build `cls` from a decoded map, checking every field's type, a nested message's (the peer
    link's) as its own message; BadRequest names the field (`init.path` inside a rank_place).
    `within`: the outer message's tag and field, for a nested one."""
    tag, path = (within.split(":", 1) if within else (cls.TAG, ""))
    if not isinstance(data, dict):
        raise BadRequest(f"{tag}: field {path[:-1]!r} must be a map" if path else f"{tag}: body must be a map")
    hints = _HINTS.get(cls)
    if hints is None:
        # The dataclass fields only: a ClassVar (TAG, an admin request's OP) is no wire field.
        every = typing.get_type_hints(cls)
        hints = _HINTS[cls] = {f.name: every[f.name] for f in dataclasses.fields(cls)}
    unknown = set(data) - set(hints)
    if unknown:
        raise BadRequest(f"{tag}: unknown field(s) {sorted(path + str(u) for u in unknown)}")
    inner = nested(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise BadRequest(f"{tag}: missing field {path + f.name!r}")
            continue
        value = data[f.name]
        if f.name in inner:
            value = from_wire(inner[f.name], value, f"{tag}:{path}{f.name}.")
        elif not _check(value, hints[f.name]):
            raise BadRequest(
                f"{tag}: field {path + f.name!r} has type {type(value).__name__}, "
                f"expected {hints[f.name]}"
            )
        kwargs[f.name] = value
    return cls(**kwargs)


def _tags(*classes: type[Message]) -> dict[str, type[Message]]:
    table = {c.TAG: c for c in classes}
    assert len(table) == len(classes), "two messages of one direction share a tag"
    return table


# One table per direction: a message that may not travel that way is a BAD_REQUEST.
TO_SUPERVISOR_FROM_CLIENT = _tags(StatusRequest, GenerateRequest, CountTokens, EmbedRequest, RerankRequest, Cancel,
                                  LoadRequest, UnloadRequest, A.AdminRequest, HistoryRequest, *A.REQUESTS, *P.REQUESTS)
TO_CLIENT = _tags(StatusReply, Chunk, Final, TokenCount, Embeddings, RerankScores, Error, Ack, HistoryReply, *A.REPLIES,
                  *P.REPLIES)
TO_WORKER = _tags(Init, GenerateRequest, CountTokens, EmbedRequest, RerankRequest, Cancel, Shutdown, Adopt,
                  ClearPrefixCache)
TO_SUPERVISOR_FROM_WORKER = _tags(Hello, Ready, Heartbeat, Chunk, Chunks, Final, TokenCount, Embeddings, RerankScores,
                                  Error)
