"""docs/grafana-dashboard.json: a valid Grafana dashboard (schema version, a Prometheus datasource
variable every query uses, panels on the 24-column grid without overlaps) whose PromQL names only
metrics a real supervisor exposes on /metrics, with labels those metrics carry, and which covers
what an operator looks at (states, restarts, failures by code, queue, tokens/s, memory, store
health, prefix cache, latency). The same contract tests/test_metrics.py holds docs/alerts.yaml to."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import REPO

pytestmark = pytest.mark.timeout(120)

DASHBOARD = REPO / "docs" / "grafana-dashboard.json"

# PromQL's functions and aggregation operators (what may stand before a parenthesis).
FUNCTIONS = {
    "abs", "absent", "absent_over_time", "avg", "avg_over_time", "bottomk", "ceil", "changes", "clamp",
    "clamp_max", "clamp_min", "count", "count_over_time", "count_values", "delta", "deriv", "exp", "floor",
    "group", "histogram_quantile", "idelta", "increase", "irate", "label_join", "label_replace", "last_over_time",
    "ln", "log2", "log10", "max", "max_over_time", "min", "min_over_time", "predict_linear", "quantile",
    "quantile_over_time", "rate", "resets", "round", "scalar", "sgn", "sort", "sort_desc", "sqrt", "stddev",
    "stddev_over_time", "stdvar", "sum", "sum_over_time", "time", "timestamp", "topk", "vector",
}
# Keywords followed by a parenthesised list of label names.
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = {"bool", "and", "or", "unless", "offset"}
# Functions over a range of a counter (or a histogram's counters): never applied to a gauge.
COUNTER_FUNCTIONS = {"rate", "irate", "increase"}

_TOKEN = re.compile(r"""
    (?P<string>"(?:\\.|[^"\\])*")
  | (?P<range>\[[^\]]*\])
  | (?P<braces>\{(?:"(?:\\.|[^"\\])*"|[^}"])*\})
  | (?P<number>\d+(?:\.\d+)?(?:e[+-]?\d+)?\b)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<space>\s+)
  | (?P<paren>[()])
  | (?P<comma>,)
  | (?P<op>[+\-*/%^<>=!]+)
""", re.VERBOSE)
_MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"(?:\\.|[^"\\])*"\s*(?:,|$)')


class Selector:
    def __init__(self, metric: str, labels: set[str], under: str | None) -> None:
        self.metric, self.labels, self.under = metric, labels, under


def parse_promql(expr: str) -> tuple[list[Selector], set[str], list[set[str]]]:
    """(selectors with the label names they match on and the function they are an argument of,
    functions called, grouping label lists). Strict enough to catch a misspelt metric, label or
    function: anything it does not recognise fails the test."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        assert m is not None, f"cannot read {expr[pos:pos + 20]!r} in {expr!r}"
        pos = m.end()
        if m.lastgroup != "space":
            tokens.append((m.lastgroup, m.group()))
    tokens.append(("end", ""))
    selectors: list[Selector] = []
    functions: set[str] = set()
    groupings: list[set[str]] = []
    calls: list[str | None] = []  # the function each open parenthesis belongs to (None: plain brackets)
    pending: str | None = None  # a function whose "(" comes next (after its by/without clause)
    i = 0
    while tokens[i][0] != "end":
        kind, text = tokens[i]
        nxt = tokens[i + 1]
        if kind == "ident" and text in GROUPING:
            assert nxt[1] == "(", f"{text} without a label list in {expr!r}"
            j, labels = i + 2, set()
            while tokens[j][1] != ")":
                assert tokens[j][0] in ("ident", "comma"), f"unexpected {tokens[j][1]!r} in {text}(...) of {expr!r}"
                if tokens[j][0] == "ident":
                    labels.add(tokens[j][1])
                j += 1
            groupings.append(labels)
            i = j + 1
            continue
        if kind == "ident" and text in KEYWORDS:
            pass
        elif kind == "ident" and (nxt[1] == "(" or (nxt[1] in ("by", "without") and text in FUNCTIONS)):
            assert text in FUNCTIONS, f"unknown PromQL function {text!r} in {expr!r}"
            functions.add(text)
            pending = text
        elif kind == "ident":
            labels = set()
            if nxt[0] == "braces":
                body = nxt[1][1:-1].strip()
                consumed = 0
                while consumed < len(body):
                    m = _MATCHER.match(body, consumed)
                    assert m is not None, f"cannot read label matchers {nxt[1]!r} in {expr!r}"
                    labels.add(m.group(1))
                    consumed = m.end()
                i += 1
            selectors.append(Selector(text, labels, calls[-1] if calls else None))
        elif kind == "braces":
            raise AssertionError(f"a selector without a metric name in {expr!r}")
        elif kind == "paren" and text == "(":
            calls.append(pending)
            pending = None
        elif kind == "paren":
            assert calls, f"unbalanced parentheses in {expr!r}"
            calls.pop()
        i += 1
    assert not calls and pending is None, f"unbalanced parentheses in {expr!r}"
    return selectors, functions, groupings


def _walk(panels: list[dict]):
    for panel in panels:
        yield panel
        yield from _walk(panel.get("panels", []))


def _queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and annotation."""
    out = []
    for panel in _walk(dashboard["panels"]):
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} target {target['refId']}", target["expr"]))
    for ann in dashboard["annotations"]["list"]:
        if "expr" in ann:
            out.append((f"annotation {ann['name']!r}", ann["expr"]))
    return out


def _grafana_variables(expr: str) -> str:
    """What Grafana substitutes before Prometheus sees the query."""
    return expr.replace("$__rate_interval", "5m").replace("$model", ".*")


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_the_dashboard_is_a_valid_grafana_dashboard(dashboard: dict) -> None:
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert dashboard["title"] and dashboard["uid"] and "id" not in dashboard  # importable anywhere
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    model_var = variables["model"]
    assert model_var["datasource"]["uid"] == "${datasource}"
    assert re.fullmatch(r"label_values\((lmx_[a-z_]+), model\)", model_var["definition"])

    ids, cells = set(), {}
    panels = list(_walk(dashboard["panels"]))
    assert len(panels) >= 20
    for panel in panels:
        assert panel["id"] not in ids, f"duplicate panel id {panel['id']}"
        ids.add(panel["id"])
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("h", "w", "x", "y")), panel["title"]
        assert grid["w"] >= 1 and grid["h"] >= 1 and 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["type"] in {"stat", "timeseries", "table", "state-timeline", "gauge", "bargauge", "heatmap"}
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], f"{panel['title']!r} has no query"
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert target["expr"].strip()


def test_every_query_parses_and_the_dashboard_covers_what_operators_watch(dashboard: dict) -> None:
    used = set()
    for where, expr in _queries(dashboard):
        selectors, functions, groupings = parse_promql(_grafana_variables(expr))
        assert selectors, f"{where}: no metric in {expr!r}"
        used |= {s.metric for s in selectors}
        if "histogram_quantile" in functions:
            assert all("le" in g for g in groupings), f"{where}: histogram_quantile without le in by()"
    for name in ["lmx_model_state", "lmx_model_restarts_total", "lmx_worker_crashes_total",
                 "lmx_model_queued_requests", "lmx_generated_tokens_total", "lmx_requests_total",
                 "lmx_worker_rss_bytes", "lmx_worker_mlx_active_bytes", "lmx_memory_budget_bytes",
                 "lmx_memory_reserved_bytes", "lmx_memory_stranded_bytes", "lmx_store_degraded",
                 "lmx_store_write_seconds_bucket", "lmx_prefix_cache_hit_tokens_total",
                 "lmx_prefix_cache_miss_tokens_total", "lmx_prefix_cache_bytes", "lmx_prefix_cache_evictions_total",
                 "lmx_prefix_cache_disk_bytes", "lmx_time_to_first_token_seconds_bucket",
                 "lmx_inter_token_latency_seconds_bucket", "lmx_model_quarantined", "lmx_supervisor_safe_mode"]:
        assert name in used, f"the dashboard shows nothing of {name}"


def test_the_parser_catches_what_it_must() -> None:
    sels, fns, groups = parse_promql('sum by (le, model) (rate(x_bucket{model=~".*", a!="}"}[5m])) / on() y')
    assert [(s.metric, s.labels, s.under) for s in sels] == [("x_bucket", {"model", "a"}, "rate"), ("y", set(), None)]
    assert fns == {"sum", "rate"} and groups == [{"le", "model"}, set()]
    for bad in ['sum(rat(x[5m]))', 'x{model~"a"}', 'sum(x', '{a="b"}']:
        with pytest.raises(AssertionError):
            parse_promql(bad)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_query_names_metrics_and_labels_a_real_supervisor_exposes(
        dashboard: dict, make_supervisor, tiny_model: Path) -> None:
    port = _free_port()
    sup = make_supervisor([{"id": "m", "path": str(tiny_model)}], supervisor={"metrics_port": port}).start()
    sup.client.complete("m", "Hello", max_tokens=4)
    pid = sup.model("m")["worker_pid"]
    os.kill(pid, signal.SIGKILL)  # so the crash and restart counters have samples (and their labels)
    sup.wait_model("m", lambda m: m["state"] == "READY" and m["worker_pid"] != pid, 30, "READY again")
    sup.client.complete("m", "Hello", max_tokens=4)
    # The new worker's figures (memory, prefix cache) come with its heartbeats: one must have come.
    sup.wait_model("m", lambda m: "bytes" in m["prefix_cache"] and m["memory"], 30, "the new worker's heartbeat")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()

    # Sample name -> (family type, label names seen on it); histogram and counter suffixes are the
    # samples' own names, so `_bucket`, `_sum`, `_count` and `_total` come from the exposition itself.
    exposed: dict[str, tuple[str, set[str]]] = {}
    for family in text_string_to_metric_families(text):
        names = {"counter": [family.name + "_total"],
                 "histogram": [family.name + s for s in ("_bucket", "_sum", "_count")]}.get(family.type,
                                                                                           [family.name])
        for name in names:
            exposed.setdefault(name, (family.type, set()))
        for sample in family.samples:
            exposed.setdefault(sample.name, (family.type, set()))[1].update(sample.labels)

    queries = _queries(dashboard)
    model_var = next(v for v in dashboard["templating"]["list"] if v["name"] == "model")
    queries.append(("variable model", re.fullmatch(r"label_values\((\w+), model\)", model_var["definition"])[1]))
    for where, expr in queries:
        selectors, _, groupings = parse_promql(_grafana_variables(expr))
        for s in selectors:
            assert s.metric in exposed, f"{where} names {s.metric!r}, which the supervisor does not expose"
            kind, labels = exposed[s.metric]
            assert labels or s.metric.endswith(("_total", "_bucket", "_sum", "_count")) or not s.labels, \
                f"{where}: {s.metric} has no samples to check labels against"
            missing = s.labels - labels
            assert not missing, f"{where} matches {s.metric} on labels it does not have: {missing}"
            if s.under in COUNTER_FUNCTIONS:
                assert kind in ("counter", "histogram"), f"{where}: {s.under}() of {s.metric}, a {kind}"
        carried = set().union(*(exposed[s.metric][1] for s in selectors))
        for labels in groupings:
            assert labels <= carried, f"{where} groups by {labels - carried}, which none of its metrics carry"
