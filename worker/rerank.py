"""The rerank worker's engine: a BERT or XLM-RoBERTa cross-encoder in mlx (worker.embed's encoder,
then a dense + tanh on the first token, BERT's pooler or RoBERTa's classification head, and a
one-label output whose logit is the pair's relevance), and the batcher that scores RerankRequests'
(query, document) pairs in passes bounded by padded tokens.

Each pair is tokenized as the model was trained, by the snapshot's tokenizer.json and its pair
template (BERT's `[CLS] query [SEP] document [SEP]` with segment 1 for the document; XLM-RoBERTa's
`<s> query </s></s> document </s>`, one segment), and cut longest-first to the model's position
limit, as sentence-transformers' CrossEncoder does; the reply names the documents
whose pair was cut. The score is the raw logit, no sigmoid (the gateway's relevance_score is its
sigmoid, docs/gateway.md). Like the embed worker, it never imports mlx_lm or transformers.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from protocol.errors import ErrorCode
from protocol.messages import Error, RerankRequest, RerankScores
from worker.embed import EmbedBatcher, EmbedEngine, _json, batches

ENGINE = ("lmx_rerank", "1")  # the registry's backend key (supervisor.admission.architectures)
# Each model_type's sequence classifier (supervisor.kinds.CROSS_ENCODERS detects the kind from the
# same config.json key) and its head: the dense + tanh on the first token, then the one-label output.
CLASSIFIERS = {"bert": "BertForSequenceClassification", "xlm-roberta": "XLMRobertaForSequenceClassification"}
HEADS = {"bert": ("pooler.dense", "classifier"), "xlm-roberta": ("classifier.dense", "classifier.out_proj")}
TYPES = frozenset(CLASSIFIERS)
ARCHITECTURES = frozenset(CLASSIFIERS.values())


def _labels(cfg: dict) -> int:
    """A classifier's outputs as transformers counts them (supervisor.kinds.num_labels)."""
    labels = cfg.get("id2label")
    if isinstance(labels, dict) and labels:
        return len(labels)
    value = cfg.get("num_labels")
    return value if isinstance(value, int) and not isinstance(value, bool) else 2


def refusal(cfg: dict) -> str | None:
    """Why config.json is no cross-encoder this worker runs, or None."""
    archs = [a for a in cfg.get("architectures") or [] if isinstance(a, str)]
    if CLASSIFIERS.get(cfg.get("model_type")) not in archs:  # type: ignore[arg-type]
        return (f"model_type {cfg.get('model_type')!r} with architectures {archs} is no cross-encoder this "
                f"worker implements ({sorted(ARCHITECTURES)})")
    if _labels(cfg) != 1:
        return f"a cross-encoder scores with one label; this classifier has {_labels(cfg)}"
    return None


class RerankEngine(EmbedEngine):
    """The encoder's weights with the pooler's and the classifier's, and the pair tokenizer."""

    def versions(self) -> dict:
        return {"mlx": self._mx.__version__, ENGINE[0]: ENGINE[1]}

    def load(self, path: str) -> float:
        start = time.monotonic()
        root = Path(path)
        cfg = _json(root / "config.json") or {}
        problem = refusal(cfg)
        if problem is not None:
            raise ValueError(problem)
        self._cfg, bert = cfg, cfg["model_type"] == "bert"
        if not bert:  # RoBERTa numbers positions from its padding id + 1
            self.position_offset = int(cfg.get("pad_token_id", 1)) + 1
        self._weights(root)
        self._head = HEADS[cfg["model_type"]]
        missing = [f"{n}.{p}" for n in self._head for p in ("weight", "bias") if f"{n}.{p}" not in self._w]
        if missing:
            raise ValueError(f"the weights lack the cross-encoder's head: {missing}")
        self._tokenizer(root, cfg)
        if bert and 1 not in self._tok.encode("query", "document").type_ids:
            raise ValueError("tokenizer.json has no pair template (segment 1 for the document)")
        self.dims = 1
        self.model = self
        return time.monotonic() - start

    def batcher(self, progress: Any, send: Any) -> "RerankBatcher":
        return RerankBatcher(self, progress, send)

    def pairs(self, query: str, documents: list[str]) -> tuple[list[list[int]], list[list[int]], list[int]]:
        """Each (query, document) pair's ids and segments, and the indices of the pairs cut to fit."""
        encoded = self._tok.encode_batch([(query, d) for d in documents])
        return ([e.ids for e in encoded], [e.type_ids for e in encoded],
                [i for i, e in enumerate(encoded) if e.overflowing])

    def score(self, ids: list[list[int]], types: list[list[int]]) -> np.ndarray:
        """The classifier's logit of each pair of one pass, float32 [len(ids)]."""
        mx, w = self._mx, self._w
        longest = max(len(s) for s in ids)

        def padded(rows: list[list[int]], value: int) -> Any:
            return mx.array([r + [value] * (longest - len(r)) for r in rows], dtype=mx.int32)

        mask = mx.array([[1.0] * len(s) + [0.0] * (longest - len(s)) for s in ids], dtype=mx.float32)
        hidden = self._encode(padded(ids, self._pad), mask, padded(types, 0))
        dense, out = self._head
        pooled = mx.tanh(hidden[:, 0] @ w[f"{dense}.weight"] + w[f"{dense}.bias"])
        logits = pooled @ w[f"{out}.weight"] + w[f"{out}.bias"]
        mx.eval(logits)
        return np.array(logits[:, 0], dtype=np.float32)


class RerankBatcher(EmbedBatcher):
    """EmbedBatcher's loop (every waiting request in the next step, passes of at most
    EMBED_BATCH_TOKENS padded tokens shared between requests), answering each with RerankScores."""

    SERVES = RerankRequest

    def _answer_all(self, reqs: list) -> list[RerankScores | Error]:
        engine: RerankEngine = self._engine  # type: ignore[assignment]
        served, ids, types, out = [], [], [], []
        for req in reqs:
            try:
                pair_ids, pair_types, cut = engine.pairs(req.query, req.documents)
            except (ValueError, TypeError) as exc:
                out.append(Error(req.request_id, ErrorCode.BAD_REQUEST.code, f"cannot rerank: {exc}"))
                continue
            served.append((req, len(ids), cut))
            ids.extend(pair_ids)
            types.extend(pair_types)
        scores = np.zeros(len(ids), dtype=np.float32)
        for part in batches([len(s) for s in ids]):
            scores[part] = engine.score([ids[i] for i in part], [types[i] for i in part])
            self._progress.count += 1  # a pass done: progress, for the stall watch
        for req, start, cut in served:
            end = start + len(req.documents)
            tokens = sum(len(s) for s in ids[start:end])
            out.append(RerankScores(req.request_id, [float(x) for x in scores[start:end]], tokens, cut))
        return out
