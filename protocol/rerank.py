"""The rerank wire: RerankRequest (a query and the documents to score against it) and its one reply,
RerankScores (a raw logit per document, in the documents' order), with their bounds, and the
client's RerankResult. Each message bounds itself (`bounds`, called by protocol.limits.check),
so the limits module does not grow a section per kind."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Optional

from protocol import limits
from protocol.errors import BadRequest
from protocol.wirebase import Message

# Cohere's bound on documents per request. The reply is a float per document, far inside a frame;
# what bounds the work is the characters, tokenized all at once in the worker (each pair is cut to
# the model's position limit there).
MAX_RERANK_DOCUMENTS = 1000
MAX_RERANK_QUERY_CHARS = 65_536
MAX_RERANK_DOCUMENT_CHARS = 65_536
MAX_RERANK_TOTAL_CHARS = 2_000_000


@dataclass
class RerankRequest(Message):
    """Score each of `documents` against `query` with a rerank model (a cross-encoder reads each
    (query, document) pair in one forward pass). Answered with one RerankScores."""

    TAG: ClassVar[str] = "rerank"
    request_id: str
    model: str
    query: str
    documents: list[str]
    timeout_s: Optional[float] = None

    def bounds(self, from_worker: bool = False) -> None:
        t = self.TAG
        limits.check_request(t, self.request_id, self.model, self.timeout_s)
        if not 1 <= len(self.query) <= MAX_RERANK_QUERY_CHARS:
            raise BadRequest(f"{t}: query has {len(self.query)} characters, not within 1..{MAX_RERANK_QUERY_CHARS}",
                             param="query")
        if not 1 <= len(self.documents) <= MAX_RERANK_DOCUMENTS:
            raise BadRequest(f"{t}: documents must hold 1..{MAX_RERANK_DOCUMENTS} entries, got {len(self.documents)}",
                             param="documents")
        for i, doc in enumerate(self.documents):
            if len(doc) > MAX_RERANK_DOCUMENT_CHARS:
                raise BadRequest(f"{t}: documents[{i}] has {len(doc)} characters, more than "
                                 f"{MAX_RERANK_DOCUMENT_CHARS}", param="documents")
        total = len(self.query) * len(self.documents) + sum(len(d) for d in self.documents)
        if total > MAX_RERANK_TOTAL_CHARS:
            raise BadRequest(f"{t}: the query with each document comes to {total} characters, more than "
                             f"{MAX_RERANK_TOTAL_CHARS}", param="documents")


@dataclass
class RerankScores(Message):
    """A RerankRequest's scores: the model's raw relevance logit per document, in the documents'
    order (no sigmoid: the gateway maps them to 0..1, and a sort by either is the same order).
    `truncated`: the indices of the documents whose pair was cut to the model's position limit.
    A score may be NaN on the wire: a broken model's, which the canary and the gateway refuse."""

    TAG: ClassVar[str] = "rerank_scores"
    request_id: str
    scores: list[float]
    prompt_tokens: int
    truncated: list[int] = field(default_factory=list)

    def bounds(self, from_worker: bool = False) -> None:
        """Only a worker's is checked (the client trusts its supervisor's, as for every reply)."""
        if not from_worker:
            return
        t = self.TAG
        if len(self.request_id) > limits.MAX_ID_CHARS:
            raise BadRequest(f"{t}: request_id is over {limits.MAX_ID_CHARS} characters")
        if len(self.scores) > MAX_RERANK_DOCUMENTS or len(self.truncated) > len(self.scores):
            raise BadRequest(f"{t}: at most {MAX_RERANK_DOCUMENTS} scores, and no more truncated than scored")
        if not all(0 <= i < len(self.scores) for i in self.truncated):
            raise BadRequest(f"{t}: truncated names a document that was not scored")
        if not 0 <= self.prompt_tokens <= MAX_RERANK_DOCUMENTS * limits.MAX_EMBED_INPUT_TOKENS:
            raise BadRequest(f"{t}: prompt_tokens {self.prompt_tokens} is out of bounds")


@dataclass
class RerankResult:
    """What SupervisorClient.rerank returns: a raw logit per document, in the documents' order."""

    scores: list[float]
    prompt_tokens: int
    truncated: list[int]

    @classmethod
    def of(cls, reply: RerankScores) -> "RerankResult":
        return cls(list(reply.scores), reply.prompt_tokens, list(reply.truncated))

    def finite(self) -> bool:
        return all(math.isfinite(s) for s in self.scores)
