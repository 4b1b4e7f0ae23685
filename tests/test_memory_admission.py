"""Memory admission: estimates, a budget with numbers in the refusal, reservations for loads in
flight, and LRU eviction when configured."""

from __future__ import annotations

import json
from pathlib import Path

from supervisor.memory import WORKER_OVERHEAD_BYTES, MemoryLedger, estimate

ONE_MODEL_BUDGET = WORKER_OVERHEAD_BYTES + 40 * 2**20  # room for one tiny model, not two


def test_estimate_is_weights_plus_kv_plus_overhead_until_a_peak_is_measured(tiny_model: Path) -> None:
    cfg = json.loads((tiny_model / "config.json").read_text())
    est = estimate(str(tiny_model), 1024)
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    assert est["weights"] == (tiny_model / "model.safetensors").stat().st_size
    assert est["kv_cache"] == 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 1024 * 2
    assert est["total"] == est["weights"] + est["kv_cache"] + WORKER_OVERHEAD_BYTES
    measured = estimate(str(tiny_model), 1024, measured_peak=10**7)
    assert measured["total"] == 10**7 + WORKER_OVERHEAD_BYTES


def test_ledger_counts_reservations_of_others() -> None:
    ledger = MemoryLedger(100)
    assert ledger.try_reserve("a", 60) and not ledger.try_reserve("b", 50)
    assert ledger.try_reserve("a", 90)  # its own earlier reservation is replaced, not added
    ledger.release("a")
    assert ledger.try_reserve("b", 50)


def test_a_model_that_does_not_fit_is_refused_with_numbers_and_no_worker(make_supervisor, tiny_model: Path) -> None:
    sup = make_supervisor([{"id": "a", "path": str(tiny_model)},
                           {"id": "b", "path": str(tiny_model), "autoload": False}],
                          supervisor={"memory_budget_bytes": ONE_MODEL_BUDGET}).start(wait_ready=False)
    sup.wait_model("a", lambda m: m["state"] == "READY", 30, "READY")
    sup.client.load("b")
    m = sup.wait_model("b", lambda m: m["state"] == "REJECTED", 10, "REJECTED")
    assert m["last_error"]["code"] == "INSUFFICIENT_MEMORY"
    assert f"{ONE_MODEL_BUDGET:,}-byte budget" in m["last_error"]["message"]
    assert not [e for e in sup.events("worker.spawned") if e["model"] == "b"]
    status = sup.status()["supervisor"]
    assert status["memory_budget_bytes"] == ONE_MODEL_BUDGET
    assert 0 < status["memory_reserved_bytes"] <= ONE_MODEL_BUDGET
    # Unloading a frees its reservation: b fits now.
    sup.client.unload("a")
    sup.client.load("b")
    sup.wait_model("b", lambda m: m["state"] == "READY", 30, "READY once a is gone")


def test_two_concurrent_loads_cannot_both_squeeze_in(make_supervisor, tiny_model: Path) -> None:
    sup = make_supervisor([{"id": "a", "path": str(tiny_model)}, {"id": "b", "path": str(tiny_model)}],
                          supervisor={"memory_budget_bytes": ONE_MODEL_BUDGET}).start(wait_ready=False)
    states = {}
    for model in ("a", "b"):
        states[model] = sup.wait_model(model, lambda m: m["state"] in ("READY", "REJECTED"), 30, "a verdict")["state"]
    assert sorted(states.values()) == ["READY", "REJECTED"]


def test_lru_eviction_makes_room_and_says_so(make_supervisor, tiny_model: Path) -> None:
    sup = make_supervisor([{"id": "old", "path": str(tiny_model)},
                           {"id": "new", "path": str(tiny_model), "autoload": False}],
                          supervisor={"memory_budget_bytes": ONE_MODEL_BUDGET, "evict": "lru"}).start(wait_ready=False)
    sup.wait_model("old", lambda m: m["state"] == "READY", 30, "READY")
    sup.client.complete("old", "Hello", max_tokens=2)
    sup.client.load("new")
    sup.wait_model("new", lambda m: m["state"] == "READY", 30, "READY")
    assert sup.model("old")["state"] == "UNLOADED"
    (event,) = sup.events("model.evicted")
    assert (event["model"], event["for_model"]) == ("old", "new")
