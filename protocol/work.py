"""What a worker is given: the Init that says what it loads and how it behaves, and the
GenerateRequest it runs. Both travel on their own and nested in the peer link's messages
(protocol.peer), so they sit below protocol.messages and protocol.peer; import them from
protocol.messages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

from protocol.wirebase import Message, added


@dataclass
class GenerateRequest(Message):
    """A generation: either `prompt` (raw text) or `messages` (chat, through the chat template)."""

    TAG: ClassVar[str] = "generate"
    request_id: str
    model: str
    prompt: Optional[str] = None
    messages: Optional[list[dict]] = None
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    timeout_s: Optional[float] = None
    # What agents send (all optional; a worker from before them never sees them set by a gateway
    # that checks the model first). tools: OpenAI function tools, rendered by the chat template and
    # parsed back with mlx-lm's tool parser. tool_choice: "auto" (default with tools), "none",
    # "required" (some call, enforced), or "function" with tool_name (that call, enforced).
    tools: Optional[list[dict]] = added()
    tool_choice: Optional[str] = added()
    tool_name: Optional[str] = added()
    # OpenAI's response_format: {"type": "json_object"} or {"type": "json_schema", "json_schema": {...}},
    # enforced by constrained decoding ({"type": "text"} or None: free text).
    response_format: Optional[dict] = added()
    logprobs: bool = added(False)
    top_logprobs: int = added(0)  # 0..20 most likely tokens beside each chosen one (needs logprobs)
    chat_template_kwargs: Optional[dict] = added()  # e.g. {"enable_thinking": False}
    top_k: int = added(0)  # sample among the k most likely tokens (0: all)
    # At most this many thinking tokens: past them, inside a think block, the model is made to write
    # its own end-of-think marker and goes on to answer (None: no limit; a model without think
    # markers: nothing to limit).
    thinking_budget: Optional[int] = added()
    # False: at most one tool call; the generation ends as the first call closes.
    parallel_tool_calls: bool = added(True)
    # "batch": waits in the supervisor's queue behind every "interactive" request (an API key's
    # priority, set by the gateway). The supervisor never sends it on to a worker.
    priority: str = added("interactive")


@dataclass
class Init(Message):
    """Supervisor -> worker: what to load and how to behave."""

    TAG: ClassVar[str] = "init"
    model_id: str
    revision: str
    path: str
    heartbeat_interval_s: float
    orphan_grace_s: float
    memory_limit_bytes: int = 0
    max_batch_size: int = 1  # > 1: continuous batching (mlx-lm BatchGenerator)
    prefill_step_size: int = 512  # prompt tokens per batch step, so prefill cannot starve decoding
    stream_interval_s: float = 0.05  # a stream's chunks after its first: at most one per interval (worker.pacing)
    # The prefix KV cache (worker.prefixcache): its memory budget (0 = off), and where hot prefixes
    # are kept across workers (None = memory only), under what disk budget, for which weights.
    prefix_cache_bytes: int = added(0)
    prefix_cache_dir: Optional[str] = added()
    prefix_cache_disk_bytes: int = added(0)
    weights_key: Optional[str] = added()
    # The model's `context_tokens`: a request whose prompt has at least this many tokens is refused
    # with BAD_REQUEST before prefill (0 = not given, nothing refused). The memory estimate budgets
    # the KV cache for this many tokens, so a longer prompt is one the model was not admitted for.
    context_tokens: int = added(0)
    # A rank of a group (worker.group): {"rank", "size", "backend", "parallel"}; None: a whole model.
    group: Optional[dict] = added()
    # What the model is (supervisor.config's kind): "generate" loads mlx-lm, "embed" the worker's
    # own BERT encoder (worker.embed). Left off the wire at "generate", as before it existed.
    kind: str = added("generate")
