"""Build the Grafana dashboards (monitoring/grafana/dashboards/*.json) from code.

    python -m monitoring.dashboards          # write the JSON files
    python -m monitoring.dashboards --check  # exit 1 when a committed file is out of date

Plain Python instead of hand-kept JSON: the panels share one shape, so the files stay alike and
a query is written once. The JSON is committed (Grafana provisioning reads the files).

Every panel queries the provisioned Prometheus through the `$datasource` variable. Models,
hosts, GPUs and keys are template variables filled from label values, so one dashboard serves
every model of the declaration: the `model` label comes from the scrape config, which is
rendered from the declaration. tests/e2e/test_monitoring.py runs every query here against a
real Prometheus scraping the local stack.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "grafana" / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
WIDTH = 24

Panel = dict[str, Any]


# ------------------------------------------------------------------ building blocks


def target(expr: str, legend: str = "", ref: str = "A") -> dict[str, Any]:
    return {"datasource": DS, "refId": ref, "expr": expr, "legendFormat": legend or "__auto",
            "range": True}


def targets(*pairs: tuple[str, str]) -> list[dict[str, Any]]:
    return [target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(pairs)]


def timeseries(title: str, tgts: list[dict[str, Any]], unit: str = "short",
               description: str = "", w: int = 12, h: int = 8, min_: float | None = None,
               max_: float | None = None, threshold: float | None = None,
               stack: bool = False) -> Panel:
    defaults: dict[str, Any] = {
        "unit": unit,
        "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10 if stack else 0,
                   "showPoints": "never", "spanNulls": False,
                   "stacking": {"mode": "normal" if stack else "none", "group": "A"}},
    }
    if min_ is not None:
        defaults["min"] = min_
    if max_ is not None:
        defaults["max"] = max_
    if threshold is not None:
        defaults["thresholds"] = {"mode": "absolute", "steps": [
            {"color": "green", "value": None}, {"color": "red", "value": threshold}]}
        defaults["custom"]["thresholdsStyle"] = {"mode": "dashed"}
    return {"type": "timeseries", "title": title, "description": description,
            "datasource": DS, "targets": tgts, "_size": (w, h),
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"legend": {"displayMode": "table", "placement": "bottom",
                                   "calcs": ["lastNotNull", "max"]},
                        "tooltip": {"mode": "multi", "sort": "desc"}}}


def stat(title: str, tgts: list[dict[str, Any]], unit: str = "short", description: str = "",
         w: int = 6, h: int = 4, thresholds: list[tuple[float, str]] | None = None) -> Panel:
    steps = [{"color": "green", "value": None}]
    steps += [{"color": color, "value": value} for value, color in thresholds or []]
    return {"type": "stat", "title": title, "description": description, "datasource": DS,
            "targets": tgts, "_size": (w, h),
            "fieldConfig": {"defaults": {"unit": unit, "thresholds": {
                "mode": "absolute", "steps": steps}}, "overrides": []},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "",
                                          "values": False},
                        "colorMode": "value", "graphMode": "area", "textMode": "auto"}}


def row(title: str) -> Panel:
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "_size": (WIDTH, 1)}


def layout(panels: list[Panel]) -> list[Panel]:
    """Ids in order and grid positions left to right, top to bottom."""
    x = y = line_h = 0
    out = []
    for i, p in enumerate(panels, start=1):
        w, h = p.pop("_size")
        if x + w > WIDTH or p["type"] == "row":
            x, y, line_h = 0, y + line_h, 0
        out.append({"id": i, **p, "gridPos": {"h": h, "w": w, "x": x, "y": y}})
        x, line_h = x + w, max(line_h, h)
        if p["type"] == "row":
            x, y, line_h = 0, y + h, 0
    return out


def datasource_var() -> dict[str, Any]:
    return {"name": "datasource", "label": "Data source", "type": "datasource",
            "query": "prometheus", "current": {}, "hide": 0, "refresh": 1, "regex": "",
            "options": [], "includeAll": False, "multi": False}


def query_var(name: str, label: str, query: str, multi: bool = True) -> dict[str, Any]:
    return {"name": name, "label": label, "type": "query", "datasource": DS,
            "definition": query,
            "query": {"qryType": 1, "query": query,
                      "refId": "PrometheusVariableQueryEditor-VariableQuery"},
            "refresh": 2, "sort": 1, "multi": multi, "includeAll": multi, "current": {},
            "hide": 0, "options": [], "regex": ""}


def dashboard(uid: str, title: str, description: str, variables: list[dict[str, Any]],
              panels: list[Panel]) -> dict[str, Any]:
    return {
        "uid": uid, "title": title, "description": description,
        "tags": ["llm-stack"], "editable": False, "graphTooltip": 1, "timezone": "browser",
        "schemaVersion": 39, "version": 1, "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "templating": {"list": [datasource_var(), *variables]},
        "annotations": {"list": []},
        "links": [{"type": "dashboards", "tags": ["llm-stack"], "asDropdown": True,
                   "title": "LLM stack", "includeVars": True, "keepTime": True}],
        "panels": layout(panels),
    }


def quantiles(metric: str, sel: str, by: str = "model",
              qs: tuple[float, ...] = (0.5, 0.95, 0.99)) -> list[dict[str, Any]]:
    return targets(*[(
        f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{{{sel}}}[{RATE}])))",
        f"{{{{{by}}}}} p{round(q * 100)}") for q in qs])


# ------------------------------------------------------------------ dashboards


def gpu() -> dict[str, Any]:
    s = 'host=~"$host", gpu=~"$gpu"'
    legend = "{{host}} GPU {{gpu}}"
    per_gpu = 'max by (host, gpu) ({m}{{{s}}})'
    panels = [
        stat("GPU utilization", targets((per_gpu.format(m="DCGM_FI_DEV_GPU_UTIL", s=s), legend)),
             "percent", "Share of time a kernel ran (DCGM_FI_DEV_GPU_UTIL).",
             thresholds=[(90, "orange")]),
        stat("Memory used", targets((
            f"max by (host, gpu) (DCGM_FI_DEV_FB_USED{{{s}}}) / (max by (host, gpu) "
            f"(DCGM_FI_DEV_FB_USED{{{s}}}) + max by (host, gpu) (DCGM_FI_DEV_FB_FREE{{{s}}}))",
            legend)), "percentunit",
            "vLLM takes its planned share when it starts: high and flat is normal. Alert: 97 %.",
            thresholds=[(0.97, "red")]),
        stat("Temperature", targets((per_gpu.format(m="DCGM_FI_DEV_GPU_TEMP", s=s), legend)),
             "celsius", "Alert above 85 C; the A10G slows its clocks near 90 C.",
             thresholds=[(80, "orange"), (85, "red")]),
        stat("Last XID", targets((per_gpu.format(m="DCGM_FI_DEV_XID_ERRORS", s=s), legend)),
             "none", "The last XID code the driver reported (0: none). A gauge, not a count.",
             thresholds=[(1, "red")]),
        row("Utilization"),
        timeseries("GPU utilization", targets(
            (per_gpu.format(m="DCGM_FI_DEV_GPU_UTIL", s=s), legend + " util"),
            (per_gpu.format(m="DCGM_FI_DEV_MEM_COPY_UTIL", s=s), legend + " memory copy")),
            "percent", min_=0, max_=100),
        timeseries("Engine activity (profiling)", targets(
            (per_gpu.format(m="DCGM_FI_PROF_GR_ENGINE_ACTIVE", s=s), legend + " graphics"),
            (per_gpu.format(m="DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", s=s), legend + " tensor"),
            (per_gpu.format(m="DCGM_FI_PROF_DRAM_ACTIVE", s=s), legend + " DRAM")),
            "percentunit", "DCGM profiling ratios: how busy the engines really are, which "
            "GPU utilization overstates.", min_=0, max_=1),
        row("Memory"),
        timeseries("Framebuffer memory", targets(
            (per_gpu.format(m="DCGM_FI_DEV_FB_USED", s=s), legend + " used"),
            (per_gpu.format(m="DCGM_FI_DEV_FB_FREE", s=s), legend + " free"),
            (per_gpu.format(m="DCGM_FI_DEV_FB_RESERVED", s=s), legend + " reserved")),
            "decmbytes", stack=True),
        timeseries("ECC errors", targets(
            (per_gpu.format(m="DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", s=s), legend + " single-bit"),
            (per_gpu.format(m="DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", s=s), legend + " double-bit"),
            (per_gpu.format(m="DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", s=s),
             legend + " rows remapped (correctable)"),
            (per_gpu.format(m="DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", s=s),
             legend + " rows remapped (uncorrectable)")),
            "short",
            "Since the driver loaded. Any double-bit error pages (GPUEccDoubleBitErrors)."),
        row("Thermals, power and clocks"),
        timeseries("Temperature", targets((per_gpu.format(m="DCGM_FI_DEV_GPU_TEMP", s=s),
                                           legend)), "celsius", threshold=85),
        timeseries("Power", targets(
            (per_gpu.format(m="DCGM_FI_DEV_POWER_USAGE", s=s), legend + " draw"),
            (per_gpu.format(m="DCGM_FI_DEV_POWER_MGMT_LIMIT", s=s), legend + " limit"),
            (f"max by (host, gpu) (rate(DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{{s}}}[{RATE}])) "
             "/ 1000", legend + " from energy counter")), "watt", min_=0),
        timeseries("Clocks (MHz)", targets(
            (per_gpu.format(m="DCGM_FI_DEV_SM_CLOCK", s=s), legend + " SM"),
            (per_gpu.format(m="DCGM_FI_DEV_MEM_CLOCK", s=s), legend + " memory")), "none"),
        timeseries("Throttled time", targets(
            (f"max by (host, gpu) (rate(DCGM_FI_DEV_POWER_VIOLATION{{{s}}}[{RATE}])) / 1e9",
             legend + " power capped"),
            (f"max by (host, gpu) (rate(DCGM_FI_DEV_THERMAL_VIOLATION{{{s}}}[{RATE}])) / 1e9",
             legend + " thermal")), "percentunit",
            "Share of time the clocks were held down by the power limit or by temperature."),
        row("Errors"),
        timeseries("XID", targets(
            (per_gpu.format(m="DCGM_FI_DEV_XID_ERRORS", s=s), legend + " last XID"),
            (f"sum by (host, gpu) (DCGM_EXP_XID_ERRORS_COUNT{{{s}}})",
             legend + " XIDs in the exporter's window")), "none",
            "DCGM_FI_DEV_XID_ERRORS holds the last code; the exporter's count covers repeats.",
            w=8),
        timeseries("Clock event reasons", targets((
            per_gpu.format(m="DCGM_FI_DEV_CLOCKS_EVENT_REASONS", s=s), legend)), "none",
            "Bitmask of why the clocks are held down now (0: nothing; 1: idle; 4: power cap; "
            "32/64: thermal slowdown).", w=8),
        timeseries("PCIe replays", targets((
            f"max by (host, gpu) (rate(DCGM_FI_DEV_PCIE_REPLAY_COUNTER{{{s}}}[{RATE}]))",
            legend)), "ops", "Link-level retries per second: a rising rate is a bad link.", w=8),
    ]
    return dashboard(
        "llm-gpu", "LLM stack / GPU (DCGM)",
        "Each GPU as dcgm-exporter reports it: utilization, memory, thermals, power, errors.",
        [query_var("host", "Host", "label_values(DCGM_FI_DEV_GPU_TEMP, host)"),
         query_var("gpu", "GPU", 'label_values(DCGM_FI_DEV_GPU_TEMP{host=~"$host"}, gpu)')],
        panels)


def vllm() -> dict[str, Any]:
    s = 'host=~"$host", model=~"$model"'
    panels = [
        stat("Requests running", targets((
            f"sum by (model) (vllm:num_requests_running{{{s}}})", "{{model}}")), w=6),
        stat("Requests waiting", targets((
            f"sum by (model) (vllm:num_requests_waiting{{{s}}})", "{{model}}")),
            description="Alert: above 10 for 5 minutes.", w=6, thresholds=[(10, "red")]),
        stat("KV cache used", targets((
            f"max by (model) (vllm:kv_cache_usage_perc{{{s}}})", "{{model}}")), "percentunit",
            "Alert: above 90 % for 10 minutes.", w=6, thresholds=[(0.9, "red")]),
        stat("Generated tokens/s", targets((
            f"sum by (model) (rate(vllm:generation_tokens_total{{{s}}}[{RATE}]))", "{{model}}")),
            w=6),
        row("Load"),
        timeseries("Requests running and waiting", targets(
            (f"sum by (model) (vllm:num_requests_running{{{s}}})", "{{model}} running"),
            (f"sum by (model) (vllm:num_requests_waiting{{{s}}})", "{{model}} waiting"))),
        timeseries("KV cache usage", targets((
            f"max by (model) (vllm:kv_cache_usage_perc{{{s}}})", "{{model}}")), "percentunit",
            min_=0, max_=1, threshold=0.9),
        timeseries("Finished requests/s by reason", targets((
            f"sum by (model, finished_reason) (rate(vllm:request_success_total{{{s}}}[{RATE}]))",
            "{{model}} {{finished_reason}}")), "reqps"),
        timeseries("Tokens/s", targets(
            (f"sum by (model) (rate(vllm:prompt_tokens_total{{{s}}}[{RATE}]))",
             "{{model}} prompt"),
            (f"sum by (model) (rate(vllm:generation_tokens_total{{{s}}}[{RATE}]))",
             "{{model}} generated"))),
        row("Latency"),
        timeseries("Time to first token", quantiles("vllm:time_to_first_token_seconds", s),
                   "s", "Alert: p95 above 5 s (loadtest/slo.yml) for 10 minutes.", threshold=5),
        timeseries("Time per output token (TPOT)",
                   quantiles("vllm:request_time_per_output_token_seconds", s), "s",
                   "Per request: decode time divided by its output tokens."),
        timeseries("Inter-token latency", quantiles("vllm:inter_token_latency_seconds", s), "s",
                   "Between two tokens of one stream."),
        timeseries("End-to-end request latency",
                   quantiles("vllm:e2e_request_latency_seconds", s), "s"),
        timeseries("Queue time", quantiles("vllm:request_queue_time_seconds", s, qs=(0.5, 0.95)),
                   "s", "Waiting for a slot in the running batch."),
        timeseries("Prefix cache hit ratio and preemptions", targets(
            (f"sum by (model) (rate(vllm:prefix_cache_hits_total{{{s}}}[{RATE}])) / "
             f"sum by (model) (rate(vllm:prefix_cache_queries_total{{{s}}}[{RATE}]))",
             "{{model}} prefix cache hits"),
            (f"sum by (model) (rate(vllm:num_preemptions_total{{{s}}}[{RATE}]))",
             "{{model}} preemptions/s")), "short",
            "Hit ratio of prompt tokens found in the prefix cache (0 to 1); preemptions mean "
            "the KV cache ran out."),
    ]
    return dashboard(
        "llm-vllm", "LLM stack / vLLM",
        "vLLM per model: load, KV cache, latency percentiles and token throughput.",
        [query_var("host", "Host", "label_values(vllm:num_requests_running, host)"),
         query_var("model", "Model",
                   'label_values(vllm:num_requests_running{host=~"$host"}, model)')],
        panels)


def gateway() -> dict[str, Any]:
    s = 'host=~"$host", model=~"$model"'
    sk = 'host=~"$host", model=~"$model", key=~"$key"'
    req = f"rate(gateway_requests_total{{{sk}}}[{RATE}])"
    panels = [
        stat("Requests/s", targets((f"sum ({req})", "all")), "reqps"),
        stat("5xx ratio", targets((
            f'(sum (rate(gateway_requests_total{{{sk}, status=~"5.."}}[{RATE}])) or vector(0)) '
            f"/ sum ({req})", "5xx")), "percentunit", "Alert: above 1 % for 5 minutes.",
            thresholds=[(0.01, "red")]),
        stat("429 ratio", targets((
            f'(sum (rate(gateway_requests_total{{{sk}, status="429"}}[{RATE}])) or vector(0)) '
            f"/ sum ({req})", "429")), "percentunit", "Alert: above 5 % for 15 minutes.",
            thresholds=[(0.05, "orange")]),
        stat("Backends up", targets((
            f"sum (gateway_backend_up{{{s}}}) / count (gateway_backend_up{{{s}}})", "up")),
            "percentunit", "As the gateway's last /ready check saw them."),
        row("Traffic"),
        timeseries("Requests/s by model", targets((f"sum by (model) ({req})", "{{model}}")),
                   "reqps", w=8),
        timeseries("Requests/s by key", targets((f"sum by (key) ({req})", "{{key}}")), "reqps",
                   w=8),
        timeseries("Requests/s by status", targets((f"sum by (status) ({req})", "{{status}}")),
                   "reqps", w=8),
        timeseries("Tokens/s by model", targets((
            f"sum by (model, kind) (rate(gateway_tokens_total{{{sk}}}[{RATE}]))",
            "{{model}} {{kind}}"))),
        timeseries("Tokens/s by key", targets((
            f"sum by (key, kind) (rate(gateway_tokens_total{{{sk}}}[{RATE}]))",
            "{{key}} {{kind}}"))),
        row("Latency"),
        timeseries("Request duration", quantiles("gateway_request_duration_seconds", s), "s",
                   "To the last byte, streams included.", w=8),
        timeseries("Time to first byte", quantiles("gateway_time_to_first_byte_seconds", s),
                   "s", "The first token, for streams.", w=8),
        timeseries("Gateway overhead", quantiles("gateway_overhead_seconds", s, qs=(0.5, 0.99)),
                   "s", "Time the gateway itself adds (backend waits excluded).", w=8),
        row("Refusals and errors"),
        timeseries("Rate limited (429) by key and limit", targets((
            f'sum by (key, limit) (rate(gateway_rate_limited_total{{host=~"$host", '
            f'key=~"$key"}}[{RATE}]))', "{{key}} {{limit}}")), "reqps",
            "Requests refused by a per-key limit: requests or tokens per minute, concurrency."),
        timeseries("5xx ratio by model", targets((
            f'(sum by (model) (rate(gateway_requests_total{{{sk}, status=~"5.."}}[{RATE}])) '
            f"or sum by (model) ({req}) * 0) / sum by (model) ({req})", "{{model}}")),
            "percentunit", threshold=0.01),
        timeseries("Backend errors by kind", targets((
            f"sum by (model, kind) (rate(gateway_backend_errors_total{{{s}}}[{RATE}]))",
            "{{model}} {{kind}}")), "reqps",
            "connect, timeout, stream, or the backend's own 4xx/5xx answer."),
        timeseries("Backends and concurrency", targets(
            (f"max by (model) (gateway_backend_up{{{s}}})", "{{model}} up"),
            (f"sum by (model) (gateway_in_flight_requests{{{s}}})", "{{model}} in flight"),
            (f'sum (rate(gateway_ratelimit_store_errors_total{{host=~"$host"}}[{RATE}]))',
             "rate-limit store errors/s")), "short"),
    ]
    return dashboard(
        "llm-gateway", "LLM stack / Gateway",
        "The gateway: requests by key, model and status, latency, 429s, errors, overhead.",
        [query_var("host", "Host", "label_values(gateway_requests_total, host)"),
         query_var("model", "Model",
                   'label_values(gateway_requests_total{host=~"$host"}, model)'),
         query_var("key", "Key", 'label_values(gateway_requests_total{host=~"$host"}, key)')],
        panels)


def host() -> dict[str, Any]:
    s = 'host=~"$host"'
    fs = f'{s}, fstype!~"tmpfs|ramfs|overlay|squashfs|nsfs"'
    panels = [
        stat("CPU busy", targets((
            f'1 - avg by (host) (rate(node_cpu_seconds_total{{{s}, mode="idle"}}[{RATE}]))',
            "{{host}}")), "percentunit", thresholds=[(0.9, "orange")]),
        stat("Memory available", targets((
            f"node_memory_MemAvailable_bytes{{{s}}} / node_memory_MemTotal_bytes{{{s}}}",
            "{{host}}")), "percentunit"),
        stat("Models filesystem free", targets((
            f'max by (host, mountpoint) (node_filesystem_avail_bytes{{{s}, '
            f'mountpoint=~"/srv/models|/"}} / node_filesystem_size_bytes{{{s}, '
            f'mountpoint=~"/srv/models|/"}})', "{{host}} {{mountpoint}}")), "percentunit",
            "/srv/models, or / when the weights share the root filesystem. Alert: under 10 %."),
        stat("Uptime", targets((f"time() - node_boot_time_seconds{{{s}}}", "{{host}}")), "s"),
        row("CPU and memory"),
        timeseries("CPU by mode", targets((
            f'sum by (host, mode) (rate(node_cpu_seconds_total{{{s}, mode!="idle"}}[{RATE}])) '
            f"/ on (host) group_left count by (host) "
            f'(node_cpu_seconds_total{{{s}, mode="idle"}})', "{{host}} {{mode}}")),
            "percentunit", stack=True, min_=0),
        timeseries("Load per CPU", targets((
            f"node_load1{{{s}}} / on (host) count by (host) "
            f'(node_cpu_seconds_total{{{s}, mode="idle"}})', "{{host}} load1"))),
        timeseries("Memory", targets(
            (f"node_memory_MemTotal_bytes{{{s}}} - node_memory_MemAvailable_bytes{{{s}}}",
             "{{host}} used"),
            (f"node_memory_MemAvailable_bytes{{{s}}}", "{{host}} available")), "bytes",
            stack=True),
        timeseries("Pressure", targets(
            (f"rate(node_pressure_cpu_waiting_seconds_total{{{s}}}[{RATE}])", "{{host}} CPU"),
            (f"rate(node_pressure_memory_waiting_seconds_total{{{s}}}[{RATE}])",
             "{{host}} memory"),
            (f"rate(node_pressure_io_waiting_seconds_total{{{s}}}[{RATE}])", "{{host}} IO")),
            "percentunit", "Share of time some task waited for the resource (PSI)."),
        row("Disk and network"),
        timeseries("Filesystem free", targets((
            f"node_filesystem_avail_bytes{{{fs}}} / node_filesystem_size_bytes{{{fs}}}",
            "{{host}} {{mountpoint}}")), "percentunit", min_=0, max_=1, threshold=0.1),
        timeseries("Disk throughput", targets(
            (f"sum by (host, device) (rate(node_disk_read_bytes_total{{{s}}}[{RATE}]))",
             "{{host}} {{device}} read"),
            (f"sum by (host, device) (rate(node_disk_written_bytes_total{{{s}}}[{RATE}]))",
             "{{host}} {{device}} write")), "Bps"),
        timeseries("Network", targets(
            (f'sum by (host, device) (rate(node_network_receive_bytes_total{{{s}, '
             f'device!="lo"}}[{RATE}]))', "{{host}} {{device}} in"),
            (f'sum by (host, device) (rate(node_network_transmit_bytes_total{{{s}, '
             f'device!="lo"}}[{RATE}]))', "{{host}} {{device}} out")), "Bps"),
        timeseries("Scrape targets up", targets((
            f"up{{{s}}}", "{{host}} {{job}} {{model}}")), "short",
            "1 per target Prometheus reaches (InstanceDown, ModelBackendDown).", min_=0, max_=1),
    ]
    return dashboard(
        "llm-host", "LLM stack / Hosts",
        "The GPU hosts as node_exporter sees them: CPU, memory, disks, network.",
        [query_var("host", "Host", "label_values(node_uname_info, host)")], panels)


DASHBOARDS = {"gpu": gpu, "vllm": vllm, "gateway": gateway, "host": host}


def render_all() -> dict[str, str]:
    """{file name: JSON text} of every dashboard."""
    return {f"{name}.json": json.dumps(build(), indent=2) + "\n"
            for name, build in DASHBOARDS.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m monitoring.dashboards",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="exit 1 when a committed file differs from what this builds")
    args = ap.parse_args(argv)
    stale = []
    for name, text in render_all().items():
        path = OUT / name
        if path.exists() and path.read_text() == text:
            continue
        if args.check:
            stale.append(name)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(OUT.parents[2])}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run `python -m monitoring.dashboards`",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
