"""A short locust run through the local stack's front door: reports, token agreement, SLO gate."""

import csv
import json
import os
import subprocess
import sys

import httpx
import pytest
import yaml

from stack import local
from stack.render import role_defaults

pytestmark = pytest.mark.e2e


def gateway_tokens() -> float:
    port = role_defaults("gateway")["gateway_port"]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("gateway_tokens_total{") and 'key="demo"' in line)


@pytest.fixture(scope="module")
def run(local_stack, tmp_path_factory):
    out = tmp_path_factory.mktemp("loadtest")
    before = gateway_tokens()
    env = {**os.environ, "LLM_API_KEY": local_stack.key, "LLM_CA_BUNDLE": str(local_stack.ca),
           "LOADTEST_SAMPLES": str(out / "requests.jsonl"), "LLM_MAX_TOKENS": "16"}
    subprocess.run(
        [sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "--headless",
         "--host", local_stack.url, "-u", "4", "-r", "4", "-t", "25s", "--only-summary",
         "--csv", str(out / "locust"), "--csv-full-history", "--html", str(out / "locust.html")],
        cwd=local.ROOT, env=env, timeout=120)
    return out, gateway_tokens() - before


def report(run_dir, slo_file):
    return subprocess.run([sys.executable, "-m", "loadtest.report", "--dir", str(run_dir),
                           "--slo", str(slo_file)], cwd=local.ROOT, capture_output=True,
                          text=True)


def test_report_files_exist_and_parse(run):
    out, _ = run
    assert (out / "locust.html").stat().st_size > 1000
    with open(out / "locust_stats.csv") as f:
        rows = {r["Type"] + " " + r["Name"]: r for r in csv.DictReader(f)}
    assert any(k.startswith("TTFT ") for k in rows) and any(k.startswith("ITL ") for k in rows)
    assert int(rows[" Aggregated"]["Request Count"]) > 0
    samples = [json.loads(x) for f in out.glob("requests-*.jsonl")
               for x in f.read_text().splitlines()]
    assert len(samples) > 10 and all(s["ok"] for s in samples)


def test_token_counts_agree_with_the_gateway_within_5_percent(run):
    out, gateway_delta = run
    samples = [json.loads(x) for f in out.glob("requests-*.jsonl")
               for x in f.read_text().splitlines()]
    ours = sum(s.get("prompt_tokens", 0) + s.get("completion_tokens", 0) for s in samples)
    assert gateway_delta > 0
    assert abs(ours - gateway_delta) / gateway_delta <= 0.05


def test_slo_gate_passes_lenient_and_fails_impossible(run, tmp_path):
    out, _ = run
    lenient = report(out, local.ROOT / "loadtest" / "slo.yml")
    assert lenient.returncode == 0, lenient.stdout + lenient.stderr
    assert "TTFT p50 / p95 / p99" in lenient.stdout and "goodput" in lenient.stdout
    impossible = tmp_path / "slo.yml"
    impossible.write_text(yaml.safe_dump({
        "per_request": {"ttft_ms": 0.001, "tpot_ms": 0.001, "e2e_ms": 0.001},
        "thresholds": {"ttft_p95_ms_max": 0.001, "goodput_min_rps": 1000}}))
    failed = report(out, impossible)
    assert failed.returncode == 1
    assert "SLO MISSED: TTFT p95" in failed.stdout and "SLO MISSED: goodput" in failed.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["requests"] > 0 and summary["output_tokens_per_s"] > 0
