"""deploy/observability: every file parses, every metric and label its PromQL names is one a real tensorgate
scrape shows, and the collector, Prometheus, Grafana and compose files refer to each other correctly; the stack
loads every Prometheus rules file under deploy/ (deploy/monitoring's model quality and drift rules included).

The stack itself is not started here (no Docker daemon); the parts that can be checked without it are.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from tensorgate.protos import GRPCInferenceServiceStub
from tensorgate.server.auth.certs import SERVER_NAMES, write_dev_certs
from tensorgate.server.monitoring.monitor import MONITORING_FAMILIES
from tensorgate.server.telemetry.gpu import GpuCollector, GpuReading
from tensorgate.server.telemetry.metrics import MODEL_STATES, reference
from tensorgate.server.telemetry.tracing import SERVER_ERROR_CODES
from tests.onnx_models import ADD_SUB_CONFIG, add_sub_model, paced_model, write_config
from tests.otlp_sinks import grpc_sink
from tests.pki import add_sub_request
from tests.scraping import Samples, families_of, metrics_url, scrape, scrape_text, value
from tests.serving import ServerThread
from tests.test_poll import wait_for
from tests.test_tracing import _paced_request

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "observability"
MODEL_RULES = ROOT / "deploy" / "monitoring" / "prometheus-alerts.yaml"
# Where the prometheus service of docker-compose.yaml reads its configuration: rule_files are relative to it.
PROMETHEUS_DIR = "/etc/prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "tensorgate.json"
# Series Prometheus makes itself for every target, not read from /metrics.
PROMETHEUS_OWN = {"up"}
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"instance", "job"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}
PROMQL_WORDS |= {"offset", "inf", "nan"}


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file())


def test_every_file_parses() -> None:
    files = _files()
    assert {p.suffix for p in files} <= {".yaml", ".yml", ".json"}, "a file type this test does not parse"
    for path in files:
        loaded = json.loads(path.read_text()) if path.suffix == ".json" else _yaml(path)
        assert isinstance(loaded, dict) and loaded, path


# ----- PromQL against a real scrape ---------------------------------------------------------------------------


def _dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in _query_variables(dashboard):
        match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", variable["query"]["query"])
        assert match, variable["query"]
        queries.append(f"count by ({match[2]}) ({match[1]})")  # the same metric and label, as PromQL
    return queries


def _query_variables(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [v for v in dashboard["templating"]["list"] if v["type"] == "query"]


def _alert_rules(path: Path = DEPLOY / "alerts.yaml") -> list[dict[str, Any]]:
    return [rule for group in _yaml(path)["groups"] for rule in group["rules"]]


def _alert_rule(name: str, path: Path = DEPLOY / "alerts.yaml") -> dict[str, Any]:
    (rule,) = [rule for rule in _alert_rules(path) if rule["alert"] == name]
    return rule


def _alert_queries(path: Path = DEPLOY / "alerts.yaml") -> list[str]:
    return [rule["expr"] for rule in _alert_rules(path)]


def _metrics_in(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers left once strings, matchers, ranges, grouping clauses
    and Grafana variables are gone, that are neither functions (followed by "(") nor keywords."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\$\w+", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", e):
        if not e[m.end() :].lstrip().startswith("(") and m[0].lower() not in PROMQL_WORDS:
            names.add(m[0])
    return names


def _matchers(expr: str) -> list[tuple[str, str, str, str]]:
    """(metric, label, operator, value) for every `metric{label op "value"}` matcher."""
    out = []
    for m in re.finditer(r"([A-Za-z_:][\w:]*)\s*\{([^}]*)\}", expr):
        for label, op, v in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"', m[2]):
            out.append((m[1], label, op, v))
    return out


def _grouping_labels(expr: str) -> set[str]:
    groups = re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr)
    return {label.strip() for g in groups for label in g.split(",") if label.strip()}


@pytest.fixture(scope="module")
def exposed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """Sample name (`_total`, `_bucket`, ...) -> labels, for every family a real server shows after traffic, plus
    the GPU families from the readings seam (a real scrape shows them only where NVML reads a GPU). The server
    traces (to a sink) and captures (--data-dir), so the families only those show are there too."""
    root = tmp_path_factory.mktemp("deploy")
    repo = root / "models"
    add_sub_model(repo / "add_sub" / "1" / "model.onnx")
    write_config(repo, "add_sub", 'name: "add_sub"\n' + ADD_SUB_CONFIG)
    with (
        grpc_sink(lambda body, headers: None) as endpoint,
        ServerThread(repo, data_dir=root / "data", otlp_endpoint=endpoint, otlp_insecure=True) as server,
    ):
        with grpc.insecure_channel(server.address) as channel:
            stub = GRPCInferenceServiceStub(channel)
            stub.ModelInfer(add_sub_request(rows=3), timeout=10)
            with pytest.raises(grpc.RpcError):
                stub.ModelInfer(add_sub_request("no_such_model"), timeout=10)
        families = families_of(scrape_text(metrics_url(server)))
    gpu = CollectorRegistry()
    gpu.register(GpuCollector(lambda: [GpuReading(0, "GPU-1", "NVIDIA H100", 1, 2, 0.5, 0.25)]))
    families |= families_of(generate_latest(gpu).decode())
    labels = {s.name: set(s.labels) for s in [*reference(), *MONITORING_FAMILIES]}
    out: dict[str, set[str]] = {}
    for name, (kind, _) in families.items():
        if kind == "histogram":
            for suffix in ("_bucket", "_count", "_sum"):
                out[name + suffix] = labels[name] | ({"le"} if suffix == "_bucket" else set())
        else:
            out[name] = labels[name]
    return out


QUERIES = [pytest.param(q, id=f"dashboard{i}") for i, q in enumerate(_dashboard_queries())]
QUERIES += [pytest.param(q, id=f"alert{i}") for i, q in enumerate(_alert_queries())]
QUERIES += [pytest.param(q, id=f"model-alert{i}") for i, q in enumerate(_alert_queries(MODEL_RULES))]


@pytest.mark.parametrize("expr", QUERIES)
def test_promql_names_only_metrics_and_labels_a_real_scrape_shows(expr: str, exposed: dict[str, set[str]]) -> None:
    names = _metrics_in(expr)
    assert names, f"no metric found in {expr!r}"
    assert names - PROMETHEUS_OWN <= exposed.keys(), f"not on /metrics: {sorted(names - exposed.keys())}"
    known = TARGET_LABELS | {label for n in names - PROMETHEUS_OWN for label in exposed[n]}
    assert _grouping_labels(expr) <= known | {"le"}, expr
    for metric, label, op, v in _matchers(expr):
        if metric in PROMETHEUS_OWN:
            continue
        assert label in exposed[metric] | TARGET_LABELS, (metric, label)
        values = {"code": {c.name for c in grpc.StatusCode}, "state": set(MODEL_STATES)}.get(label)
        if values is not None and "$" not in v:
            wanted = set(v.split("|")) if op in ("=~", "!~") else {v}
            assert wanted <= values, (metric, label, v)


def test_the_metric_finder_finds_what_it_should() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, model) (rate(tensorgate_request_duration_seconds_bucket{model=~"a"}'
        "[5m]))) / ignoring(le) up offset 5m > 1e3 and on (model) tensorgate_queue_depth"
    )
    assert _metrics_in(expr) == {"tensorgate_request_duration_seconds_bucket", "up", "tensorgate_queue_depth"}
    assert _grouping_labels(expr) == {"le", "model"}


def test_dashboard_legends_name_labels_their_query_has(exposed: dict[str, set[str]]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            grouped = _grouping_labels(re.sub(r"\bby\s*\(le,?\s*", "by (", expr))
            labels = grouped or TARGET_LABELS | {label for n in _metrics_in(expr) for label in exposed[n]}
            used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target["legendFormat"]))
            assert used <= labels, (panel["title"], used - labels)


def test_dashboard_quantiles_of_the_model_variable_keep_models_apart() -> None:
    """With several models selected, a quantile over their buckets summed together blends one model's queue wait
    or latency with another's: every quantile of a $model-filtered histogram is taken per model, and its legend
    says which."""
    quantiles = 0
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            if expr.startswith("histogram_quantile(") and 'model=~"$model"' in expr:
                quantiles += 1
                assert "model" in _grouping_labels(expr), (panel["title"], expr)
                assert "{{model}}" in target["legendFormat"], (panel["title"], target["legendFormat"])
    assert quantiles >= 8


def test_dashboard_covers_the_metrics_the_issue_asks_for() -> None:
    used = {name for q in _dashboard_queries() for name in _metrics_in(q)}
    for name in (
        "tensorgate_inference_requests_total",
        "tensorgate_request_duration_seconds_bucket",
        "tensorgate_queue_duration_seconds_bucket",
        "tensorgate_compute_duration_seconds_bucket",
        "tensorgate_batch_size_bucket",
        "tensorgate_queue_depth",
        "tensorgate_inflight_requests",
        "tensorgate_model_state",
        "tensorgate_model_load_duration_seconds",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "tensorgate_gpu_memory_used_bytes",
        "tensorgate_gpu_utilization_ratio",
        # Telemetry lost on the way: traces to the collector, prediction samples to the monitoring store.
        "tensorgate_trace_spans_dropped_total",
        "tensorgate_capture_dropped_total",
    ):
        assert name in used, name


def test_dashboard_panels_have_distinct_ids_and_fit_the_grid() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for p in panels:
        grid = p["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, p["title"]


def test_dashboard_reads_the_data_source_its_importer_picks() -> None:
    """Every query reads the dashboard's data source variable, which defaults to the stack's provisioned
    Prometheus: with that uid written into each panel, importing the dashboard into a Grafana whose Prometheus
    has another uid (any Grafana but this stack's) left every panel on "data source not found"."""
    dashboard = json.loads(DASHBOARD.read_text())
    sources = _yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "datasources.yaml")["datasources"]
    prometheus = next(s for s in sources if s["type"] == "prometheus")
    (variable,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == "prometheus" and variable["current"]["value"] == prometheus["uid"]
    readers = [t for p in dashboard["panels"] for t in p.get("targets", [])]
    readers += [p for p in dashboard["panels"] if "datasource" in p] + _query_variables(dashboard)
    assert readers and {json.dumps(r["datasource"]) for r in readers} == {
        json.dumps({"type": "prometheus", "uid": "${" + variable["name"] + "}"})
    }


# ----- the collector, Prometheus and compose wiring -----------------------------------------------------------


def test_collector_pipelines_use_only_defined_components_and_every_defined_one_is_used() -> None:
    config = _yaml(DEPLOY / "otel-collector.yaml")
    used: dict[str, set[str]] = {"receivers": set(), "processors": set(), "exporters": set()}
    pipelines = config["service"]["pipelines"]
    assert pipelines
    for name, pipeline in pipelines.items():
        assert name.split("/")[0] in ("traces", "metrics", "logs"), name
        assert pipeline["receivers"] and pipeline["exporters"], name
        for kind in used:
            for component in pipeline.get(kind, []):
                assert component in config[kind], f"pipeline {name} names undefined {kind[:-1]} {component}"
                used[kind].add(component)
    for kind, names in used.items():
        assert names == set(config[kind]), f"{kind} defined but in no pipeline: {set(config[kind]) - names}"
    assert set(config["service"].get("extensions", [])) <= set(config.get("extensions", {}))
    assert set(config["receivers"]["otlp"]["protocols"]) == {"grpc", "http"}
    traces = pipelines["traces"]
    assert traces["processors"][0] == "memory_limiter", "the memory limiter goes first"
    assert {"otlp/jaeger", "otlp/tempo", "debug"} <= set(traces["exporters"])


def _host(endpoint: str) -> str:
    return re.sub(r"^\w+://", "", endpoint).split(":")[0]


def test_compose_mounts_files_that_exist_and_services_reach_each_other_by_name() -> None:
    compose = _yaml(DEPLOY / "docker-compose.yaml")
    services = compose["services"]
    assert {"otel-collector", "jaeger", "tempo", "prometheus", "grafana"} <= services.keys()
    for name, service in services.items():
        assert ":" in service["image"] and not service["image"].endswith(":latest"), f"{name}: pin the image"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith(("./", "../")), f"{name}: {volume} is not a file of this repository"
            assert (DEPLOY / source).resolve().is_relative_to(ROOT) and (DEPLOY / source).exists(), (name, volume)
        for dependency in service.get("depends_on", []):
            assert dependency in services, (name, dependency)
    collector = _yaml(DEPLOY / "otel-collector.yaml")
    for name, exporter in collector["exporters"].items():
        if "endpoint" in exporter:
            assert _host(exporter["endpoint"]) in services, name
    for source in _yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "datasources.yaml")["datasources"]:
        assert _host(source["url"]) in services, source["name"]
    loaded = _loaded_rule_files()
    assert len(loaded) == len(_yaml(DEPLOY / "prometheus.yml")["rule_files"])
    for path in loaded.values():
        assert path.is_file() and isinstance(_yaml(path)["groups"], list), path
    dashboards = _yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "dashboards.yaml")["providers"][0]
    assert any(v.endswith(":" + dashboards["options"]["path"] + ":ro") for v in services["grafana"]["volumes"])


def _prometheus_mounts() -> dict[str, Path]:
    """Path in the prometheus container -> the file of this repository that docker-compose.yaml mounts there."""
    volumes = _yaml(DEPLOY / "docker-compose.yaml")["services"]["prometheus"]["volumes"]
    return {v.split(":")[1]: (DEPLOY / v.split(":")[0]).resolve() for v in volumes}


def _loaded_rule_files() -> dict[str, Path]:
    """Each rule file prometheus.yml names -> the repository file mounted at that path (it must be mounted)."""
    mounts = _prometheus_mounts()
    out = {}
    for rule_file in _yaml(DEPLOY / "prometheus.yml")["rule_files"]:
        path = rule_file if rule_file.startswith("/") else f"{PROMETHEUS_DIR}/{rule_file}"
        assert path in mounts, f"prometheus.yml loads {rule_file}, but docker-compose.yaml mounts nothing at {path}"
        out[rule_file] = mounts[path]
    return out


def _is_rules_file(path: Path) -> bool:
    """A Prometheus rules file: `groups:` of named groups with `rules:` (alerting or recording). Other YAML under
    deploy/ (a Kubernetes manifest) may hold several documents: none of those is a rules file."""
    documents = list(yaml.safe_load_all(path.read_text()))
    if len(documents) != 1:
        return False
    loaded = documents[0]
    groups = loaded.get("groups") if isinstance(loaded, dict) else None
    return isinstance(groups, list) and all(isinstance(g, dict) and "rules" in g for g in groups)


def test_the_stack_loads_every_rules_file_under_deploy() -> None:
    rules_files = {p.resolve() for p in (ROOT / "deploy").rglob("*.y*ml") if _is_rules_file(p)}
    assert {(DEPLOY / "alerts.yaml").resolve(), MODEL_RULES.resolve()} <= rules_files
    missing = rules_files - set(_loaded_rule_files().values())
    assert not missing, f"rules the compose stack never loads: {sorted(str(p.relative_to(ROOT)) for p in missing)}"


# ----- what the alerts say ------------------------------------------------------------------------------------


def _seconds(duration: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    match = re.fullmatch(r"(\d+)([smhdw])", duration)
    assert match, duration
    return int(match[1]) * units[match[2]]


def test_server_errors_alert_counts_exactly_the_codes_that_are_the_servers_fault() -> None:
    """The codes that fail a server span (OpenTelemetry's RPC conventions) and nothing else: RESOURCE_EXHAUSTED
    is also the answer to a caller's tensor over --max-tensor-elements, which is no server error."""
    expr = _alert_rule("TensorgateServerErrors")["expr"]
    codes = [(metric, op, v) for metric, label, op, v in _matchers(expr) if label == "code"]
    assert len(codes) == 1, codes
    ((metric, op, regex),) = codes
    assert metric == "tensorgate_inference_requests_total" and op == "=~"
    assert set(regex.split("|")) == SERVER_ERROR_CODES
    assert "RESOURCE_EXHAUSTED" not in SERVER_ERROR_CODES


def test_queueing_alert_bounds_the_mean_queue_wait_and_asks_for_a_backlog() -> None:
    """ "Cannot keep up": the mean queue wait (_sum over _count) against an absolute bound, never against compute
    time (dynamic batching makes a request wait up to max_queue_delay by design), and a queue that held requests
    at every scrape of the rates' window (min_over_time over that window: a backlog that does not drain). The
    bound is the operator's to tune: the description names it and what to set it from."""
    rule = _alert_rule("TensorgateQueueing")
    expr = " ".join(rule["expr"].split())
    assert "compute" not in expr, expr
    (window,) = set(re.findall(r"\brate\([^\[]*\[(\w+)\]", expr))
    rates = [f"rate(tensorgate_queue_duration_seconds_{part}[{window}])" for part in ("sum", "count")]
    mean = " / ".join(f"sum by (instance, model) ({rate})" for rate in rates)
    match = re.fullmatch(
        re.escape(mean)
        + r" > ([\d.]+) and "
        + re.escape(f"sum by (instance, model) (min_over_time(tensorgate_queue_depth[{window}])) > 0"),
        expr,
    )
    assert match, expr
    description = rule["annotations"]["description"]
    assert f"{float(match[1]):g} s" in description and "max_queue_delay_microseconds" in description
    assert _seconds(rule["for"]) >= _seconds(window)


def _mean(increase: Samples, histogram: str, model: str) -> float:
    labels = frozenset({"model": model, "version": "1"}.items())
    return increase[(f"{histogram}_sum", labels)] / increase[(f"{histogram}_count", labels)]


def _fires(expr: str, model: str, increase: Samples, depths: list[float]) -> bool:
    """Whether an alert expression holds for one model (one version, one instance) over traffic its windows cover
    whole: each rate(...) becomes the increase of the samples it selects, each *_over_time(tensorgate_queue_depth)
    that function of the depths the scrapes saw; the aggregations are then identities and arithmetic is left."""

    def increase_of(m: re.Match[str]) -> str:
        wanted = {("model", model), *re.findall(r'(\w+)="([^"]*)"', m[2] or "")}
        return repr(sum(v for (name, labels), v in increase.items() if name == m[1] and wanted <= labels))

    over = {"min": min, "max": max, "avg": lambda d: sum(d) / len(d)}
    e = re.sub(r"\brate\((\w+)(\{[^}]*\})?\[\w+\]\)", increase_of, expr)
    e = re.sub(r"\b(min|max|avg)_over_time\(tensorgate_queue_depth\[\w+\]\)", lambda m: repr(over[m[1]](depths)), e)
    e = " ".join(re.sub(r"\b(?:sum|min|max|avg)\s+(?:by|without)\s*\([^)]*\)", "", e).split())
    assert re.fullmatch(r"(?:[\d.e+\-*/()<>= ]|\band\b)*", e), f"cannot evaluate {e!r}"
    try:
        return bool(eval(e))  # numbers, operators and `and` only, checked above
    except ZeroDivisionError:
        return False  # no requests: NaN in PromQL, no alert


PACED_CONFIG = """
name: "paced"
backend: "onnxruntime"
max_batch_size: 1
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""
PACED_UNITS = 8.0  # about 50 ms of compute per request on this machine's cores
BURST = 32
TIMED_OUT = 3
LATE_DEADLINE_S = 0.5
"""For the late calls, sent once the burst is in the server: time for a loaded machine to take them in, a third of
the ~1.5 s they then queue behind the burst. (Sent with the burst, 0.4 s had to cover its way in too, and a loaded
runner took longer.)"""


@pytest.fixture(scope="module")
def queueing(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Samples, list[float]]]:
    """Real traffic, scraped: model -> (increase of every sample over its traffic, the queue depths scrapes saw
    while it ran).
    - batched: healthy dynamic batching. One caller at a time, so each request waits the 20 ms max_queue_delay
      for a batch that never fills: far more than its compute.
    - paced: a model that cannot keep up. BURST requests of ~50 ms at once on one instance, one row per batch,
      then TIMED_OUT more with a LATE_DEADLINE_S deadline, which pass it in the queue."""
    repo = tmp_path_factory.mktemp("queueing") / "models"
    add_sub_model(repo / "batched" / "1" / "model.onnx")
    batching = "dynamic_batching { max_queue_delay_microseconds: 20000 }\n"
    write_config(repo, "batched", 'name: "batched"\n' + ADD_SUB_CONFIG + batching)
    paced_model(repo / "paced" / "1" / "model.onnx")
    write_config(repo, "paced", PACED_CONFIG)
    out: dict[str, tuple[Samples, list[float]]] = {}
    with ServerThread(repo) as server, grpc.insecure_channel(server.address) as channel:
        stub = GRPCInferenceServiceStub(channel)
        url = metrics_url(server)

        def depth(model: str) -> float:
            return value(scrape(url), "tensorgate_queue_depth", model=model, version="1")

        def increase(before: Samples) -> Samples:
            return {k: v - before.get(k, 0.0) for k, v in scrape(url).items()}

        before, depths, done = scrape(url), [], threading.Event()

        def watch() -> None:
            while not done.is_set():
                depths.append(depth("batched"))
                time.sleep(0.01)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            for _ in range(30):
                stub.ModelInfer(add_sub_request("batched"), timeout=10)
        finally:
            done.set()
            watcher.join()
        out["batched"] = (increase(before), depths)

        before, depths = scrape(url), []
        burst = [stub.ModelInfer.future(_paced_request("paced", PACED_UNITS), timeout=60) for _ in range(BURST)]
        paced = {"model": "paced", "version": "1"}
        answered = ("tensorgate_request_duration_seconds_count", frozenset(paced.items()))

        def taken_in() -> bool:  # answered or waiting, bar the one running
            samples = scrape(url)
            return samples.get(answered, 0) + value(samples, "tensorgate_queue_depth", **paced) >= BURST - 1

        wait_for("the burst in the server", taken_in)
        late = [
            stub.ModelInfer.future(_paced_request("paced", PACED_UNITS), timeout=LATE_DEADLINE_S)
            for _ in range(TIMED_OUT)
        ]
        # With 3 answers outstanding, one runs at most: the others wait in the queue. Outstanding on the server (a
        # loaded client reads its answers late, and saw 3 outstanding when the queue was empty already).
        while (samples := scrape(url)).get(answered, 0) < BURST - 2 and not all(f.done() for f in burst):
            depths.append(value(samples, "tensorgate_queue_depth", **paced))
            time.sleep(0.02)
        for f in burst:
            f.result()
        for f in late:
            assert f.exception() is not None and f.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 10
        key = ("tensorgate_inference_requests_total", frozenset({"model": "paced", "version": "1"}.items()))
        key = (key[0], key[1] | {("code", "DEADLINE_EXCEEDED")})
        while scrape(url).get(key, 0) < TIMED_OUT and time.monotonic() < deadline:
            time.sleep(0.05)  # counted as the handler is cancelled, just after the caller's error
        out["paced"] = (increase(before), depths)
    return out


def test_queueing_alert_is_quiet_on_healthy_batching_and_fires_on_a_backlog(
    queueing: dict[str, tuple[Samples, list[float]]],
) -> None:
    """Healthy batching waits max_queue_delay for a batch, many times the compute: "queue over twice compute" held
    there by construction, so the rule fired on every batching model. It must stay quiet there and fire on a
    model whose queue does not drain."""
    expr = _alert_rule("TensorgateQueueing")["expr"]
    increase, depths = queueing["batched"]
    queued = _mean(increase, "tensorgate_queue_duration_seconds", "batched")
    assert queued > 2 * _mean(increase, "tensorgate_compute_duration_seconds", "batched"), "not the misleading case"
    assert not _fires(expr, "batched", increase, depths), (queued, depths)
    increase, depths = queueing["paced"]
    assert depths and min(depths) > 0, depths
    assert _fires(expr, "paced", increase, depths), _mean(increase, "tensorgate_queue_duration_seconds", "paced")


def test_deadline_alert_sees_the_timeouts_the_latency_histograms_do_not(
    queueing: dict[str, tuple[Samples, list[float]]],
) -> None:
    """tensorgate_request_duration_seconds records successful requests only, so the p99 alert and the latency
    panels never see a request that ran out of time: the share of DEADLINE_EXCEEDED answers does (over 1%, for
    5 minutes), and the latency alert and panel say what they cover."""
    rule = _alert_rule("TensorgateDeadlinesExceeded")
    increase, depths = queueing["paced"]
    labels = {"model": "paced", "version": "1"}
    assert value(increase, "tensorgate_inference_requests_total", **labels, code="DEADLINE_EXCEEDED") == TIMED_OUT
    assert value(increase, "tensorgate_request_duration_seconds_count", **labels) == BURST  # the timeouts are not
    assert _fires(rule["expr"], "paced", increase, depths)
    assert not _fires(rule["expr"], "batched", *queueing["batched"])
    assert re.search(r"> 0\.01\s*$", rule["expr"]) and rule["for"] == "5m", rule
    slow = _alert_rule("TensorgateSlowRequests")["annotations"]
    assert "successful requests" in slow["summary"] and "TensorgateDeadlinesExceeded" in slow["description"]
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        if any("tensorgate_request_duration_seconds" in t["expr"] for t in panel.get("targets", [])):
            assert "successful" in panel["title"].lower(), panel["title"]
            assert "DEADLINE_EXCEEDED" in panel["description"], panel["title"]


def test_label_coverage_alert_fires_only_for_models_that_had_labels() -> None:
    """label_coverage is 0 for a model that never gets feedback: the alert must not fire for ever for it, only
    when coverage fell below the threshold after being above it within the look-back window."""
    rule = _alert_rule("TensorgateModelLabelCoverageLow", MODEL_RULES)
    expr = " ".join(rule["expr"].split())
    selector = re.escape('tensorgate_model_quality{metric="label_coverage"}')
    match = re.fullmatch(
        rf"min without \(instance\) \({selector}\) < ([\d.]+) and on \(job, model, version\) "
        rf"max without \(instance\) \(max_over_time\({selector}\[(\w+)\]\)\) >= ([\d.]+)",
        expr,
    )
    assert match, expr
    assert float(match[1]) == float(match[3]) == 0.05, "one threshold, the one the rule always had"
    # The look-back must outlast `for:`, or coverage that falls would leave it before the alert could fire.
    assert _seconds(match[2]) > _seconds(rule["for"])
    description = rule["annotations"]["description"]
    assert "never get labels" in description and "5%" in description


def test_model_rules_fire_once_per_model_however_many_processes_export_it() -> None:
    """Several --reuse-port processes on one --data-dir export the same monitoring gauges, each under its own
    instance, so a bare rule fired once per process. Every read of a monitoring gauge aggregates the instances
    away (min under a floor, max over a ceiling: the worst replica where stores differ), and `on (...)` matching
    leaves instance out, as it is gone from both sides."""
    for rule in _alert_rules(MODEL_RULES):
        expr = " ".join(rule["expr"].split())
        reads = list(re.finditer(r"\btensorgate_model_(?:quality|drift)\{", expr))
        assert reads, expr
        for read in reads:
            assert re.search(r"\b(min|max) without \(instance\) \((?:max_over_time\()?$", expr[: read.start()]), expr
        assert all("instance" not in on for on in re.findall(r"\bon \(([^)]*)\)", expr)), expr
        first = re.match(r"(min|max) without \(instance\) \(.*?\) ([<>])", expr)
        assert first and first[1] == {"<": "min", ">": "max"}[first[2]], (rule["alert"], expr)


@pytest.mark.parametrize("metric", ["tensorgate_trace_spans_dropped_total", "tensorgate_capture_dropped_total"])
def test_lost_telemetry_has_an_alert(metric: str) -> None:
    """A collector that is down, or a capture writer that falls behind, loses spans or prediction samples while
    requests are served as usual: nothing else would show it."""
    (rule,) = [r for r in _alert_rules() if metric in _metrics_in(r["expr"])]
    assert re.fullmatch(rf"rate\({metric}\[(\w+)\]\) > 0", rule["expr"].strip()), rule["expr"]
    assert _seconds(rule["for"]) >= 300 and rule["annotations"]["description"]


@pytest.mark.parametrize("state", ["failed", "not_ready"])
def test_a_model_that_cannot_serve_has_an_alert_of_its_own(state: str) -> None:
    """A model that failed to load, or a remote one whose upstream is down (not_ready), keeps ServerReady false
    under --strict-readiness: a load balancer then sends the server no traffic, so no request alert fires, and
    /metrics still answers. Only its state gauge shows it (not_ready had no alert)."""
    assert state in MODEL_STATES
    (rule,) = [r for r in _alert_rules() if ("tensorgate_model_state", "state", "=", state) in _matchers(r["expr"])]
    assert rule["expr"].strip() == f'tensorgate_model_state{{state="{state}"}} == 1', rule["expr"]
    assert rule["labels"]["severity"] == "critical" and _seconds(rule["for"]) <= 600, rule
    assert {"$labels.model", "$labels.version", "$labels.instance"} <= set(re.findall(r"\$labels\.\w+", str(rule)))


def test_readme_does_not_call_the_prometheus_model_rules_tensorgates_conditions() -> None:
    """tensorgate's rules judge only windows of min_samples samples; the Prometheus quality rules cannot (no gauge
    counts a window's labelled rows), so the README must not say they hold the same conditions."""
    unguarded = [r["alert"] for r in _alert_rules(MODEL_RULES) if 'metric="samples"' not in r["expr"]]
    assert "TensorgateModelAccuracyLow" in unguarded
    readme = (ROOT / "README.md").read_text()
    paragraphs = [" ".join(p.split()) for p in readme.split("\n\n") if "prometheus-alerts.yaml" in p]
    assert paragraphs
    for paragraph in paragraphs:
        assert "same conditions" not in paragraph, paragraph
    assert any("min_samples" in p and "quality rules have none" in p for p in paragraphs)


def _commented_job() -> Any:
    """The HTTPS/mTLS job that prometheus.yml carries commented out, uncommented and parsed."""
    lines = (DEPLOY / "prometheus.yml").read_text().splitlines()
    start = lines.index("  # - job_name: tensorgate")
    block: list[str] = []
    for line in lines[start:]:
        if not line.startswith("  # "):
            break
        block.append(line[:2] + line[4:])
    return yaml.safe_load("\n".join(block))[0]


@pytest.fixture
def dev_certs(tmp_path: Path) -> Iterator[set[str]]:
    yield {p.name for p in write_dev_certs(tmp_path, ["prometheus"])}


def test_prometheus_scrapes_tensorgate_over_http_and_the_mtls_variant_is_complete(dev_certs: set[str]) -> None:
    config = _yaml(DEPLOY / "prometheus.yml")
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "tensorgate" and job["metrics_path"] == "/metrics"
    assert job.get("scheme", "http") == "http"
    (target,) = job["static_configs"][0]["targets"]
    assert target.endswith(":8002")  # the --metrics-port default
    mtls = _commented_job()
    assert mtls["scheme"] == "https" and mtls["static_configs"] == job["static_configs"]
    tls = mtls["tls_config"]
    # The files `tensorgate certs DIR --client prometheus` writes, and a name the server certificate carries.
    assert {Path(tls[k]).name for k in ("ca_file", "cert_file", "key_file")} <= dev_certs
    assert tls["server_name"] in SERVER_NAMES


def test_the_mtls_job_reads_the_directory_a_commented_volume_mounts() -> None:
    """The commented HTTPS/mTLS job reads /etc/prometheus/tls/*, which the compose file mounted nowhere: its
    prometheus service carries the volume commented too, from certs/ at the repository's root (where
    `tensorgate certs certs --client prometheus` writes, and which git ignores)."""
    tls = _commented_job()["tls_config"]
    text = (DEPLOY / "docker-compose.yaml").read_text()
    service = text.split("\n  prometheus:\n", 1)[1].split("\n  grafana:\n", 1)[0]
    commented = [m for line in service.splitlines() if (m := re.fullmatch(r"\s*# - ([^\s:]+):([^\s:]+)(?::ro)?", line))]
    ((source, target),) = [(m[1], m[2]) for m in commented]
    assert {str(Path(tls[k]).parent) for k in ("ca_file", "cert_file", "key_file")} == {target}
    assert (DEPLOY / source).resolve() == ROOT / "certs"
    assert "/certs/" in (ROOT / ".gitignore").read_text().splitlines()
    assert "tensorgate certs certs --client prometheus" in (DEPLOY / "prometheus.yml").read_text()


def test_metrics_are_not_served_on_every_interface_for_the_stack() -> None:
    """/metrics has no authentication without --tls-client-ca. The stack's Prometheus reaches the host through
    the docker bridge, so /metrics listens on the bridge's address; `--metrics-host 0.0.0.0` (every interface) is
    only ever named to warn against it, in the README and in deploy/."""
    readme = (ROOT / "README.md").read_text()
    for path, text in [(ROOT / "README.md", readme), *((p, p.read_text()) for p in _files())]:
        for hit in re.finditer(r"--metrics-host 0\.0\.0\.0", text):
            assert "not" in text[max(0, hit.start() - 20) : hit.start()].lower(), (path, text[hit.start() - 80 :][:160])
    tracing = readme.split("## Tracing through an OTel collector", 1)[1].split("\n## ", 1)[0]
    (command,) = [c for c in re.findall(r"```sh\n(.*?)```", tracing, re.DOTALL) if "tensorgate serve" in c]
    assert "--metrics-host 172.17.0.1" in command
    for text in (tracing, (DEPLOY / "docker-compose.yaml").read_text(), (DEPLOY / "prometheus.yml").read_text()):
        assert "--metrics-host 172.17.0.1" in text and "docker0" in text
