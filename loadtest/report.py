"""Summarise a load-test run and gate it on the SLO file.

    python -m loadtest.report --dir reports/<run> [--slo loadtest/slo.yml]

Reads locust's CSV (<dir>/locust_stats.csv) and the per-request samples the locustfile wrote
(<dir>/requests-*.jsonl); prints requests/s, output tokens/s, TTFT p50/p95/p99, inter-token
p50/p95, end-to-end p50/p95, errors by kind (429 apart from 5xx) and goodput; writes
<dir>/summary.json; exits 1 when a threshold of the SLO file is missed.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import yaml


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def load_samples(run: Path) -> list[dict]:
    samples = []
    for f in sorted(run.glob("requests-*.jsonl")):
        samples += [json.loads(line) for line in f.read_text().splitlines() if line]
    return samples


def duration_s(run: Path) -> float:
    """The run's length from locust's history CSV (first to last row)."""
    with open(run / "locust_stats_history.csv") as f:
        stamps = [int(r["Timestamp"]) for r in csv.DictReader(f)]
    return max(1.0, float(max(stamps) - min(stamps))) if stamps else 1.0


def summarise(run: Path, slo: dict) -> dict:
    samples = load_samples(run)
    seconds = duration_s(run)
    ok = [s for s in samples if s["ok"]]
    limits = slo.get("per_request", {})
    good = [s for s in ok if s["ttft_ms"] is not None
            and s["ttft_ms"] <= limits.get("ttft_ms", float("inf"))
            and s["tpot_ms"] <= limits.get("tpot_ms", float("inf"))
            and s["e2e_ms"] <= limits.get("e2e_ms", float("inf"))]
    itl = [g for s in ok for g in s.get("itl_ms", [])]
    ttft = [s["ttft_ms"] for s in ok if s["kind"].endswith("stream")]
    e2e = [s["e2e_ms"] for s in ok]
    n = len(samples) or 1
    errors = {"429": sum(s["status"] == 429 for s in samples),
              "5xx": sum(500 <= s["status"] < 600 for s in samples),
              "other": sum(not s["ok"] and s["status"] != 429 and not 500 <= s["status"] < 600
                           for s in samples)}
    return {
        "duration_s": seconds, "requests": len(samples),
        "requests_per_s": len(samples) / seconds,
        "prompt_tokens": sum(s.get("prompt_tokens", 0) for s in ok),
        "completion_tokens": sum(s.get("completion_tokens", 0) for s in ok),
        "output_tokens_per_s": sum(s.get("completion_tokens", 0) for s in ok) / seconds,
        "ttft_ms": {p: pct(ttft, p) for p in (50, 95, 99)},
        "itl_ms": {p: pct(itl, p) for p in (50, 95)},
        "e2e_ms": {p: pct(e2e, p) for p in (50, 95)},
        "errors": errors, "error_rate": (errors["5xx"] + errors["other"]) / n,
        "rate_limited_rate": errors["429"] / n,
        "goodput_rps": len(good) / seconds,
    }


def gate(summary: dict, thresholds: dict) -> list[str]:
    """The misses, as sentences."""
    checks = [
        ("error_rate_max", summary["error_rate"], "error rate"),
        ("rate_limited_rate_max", summary["rate_limited_rate"], "429 rate"),
        ("ttft_p95_ms_max", summary["ttft_ms"][95], "TTFT p95 (ms)"),
        ("itl_p95_ms_max", summary["itl_ms"][95], "inter-token p95 (ms)"),
        ("e2e_p95_ms_max", summary["e2e_ms"][95], "end-to-end p95 (ms)"),
    ]
    misses = [f"{label} {value:.3f} is above {thresholds[key]}" for key, value, label in checks
              if key in thresholds and value is not None and value > thresholds[key]]
    if "goodput_min_rps" in thresholds and summary["goodput_rps"] < thresholds["goodput_min_rps"]:
        misses.append(f"goodput {summary['goodput_rps']:.2f} req/s is below "
                      f"{thresholds['goodput_min_rps']}")
    if summary["requests"] == 0:
        misses.append("no request completed")
    return misses


def render(s: dict) -> str:
    def ms(v):
        return "-" if v is None else f"{v:.1f}"

    rows = [
        ("requests/s", f"{s['requests_per_s']:.2f}"),
        ("output tokens/s", f"{s['output_tokens_per_s']:.1f}"),
        ("TTFT p50 / p95 / p99 (ms)", " / ".join(ms(s["ttft_ms"][p]) for p in (50, 95, 99))),
        ("inter-token p50 / p95 (ms)", " / ".join(ms(s["itl_ms"][p]) for p in (50, 95))),
        ("end-to-end p50 / p95 (ms)", " / ".join(ms(s["e2e_ms"][p]) for p in (50, 95))),
        ("errors: 429 / 5xx / other", " / ".join(str(s["errors"][k]) for k in
                                                 ("429", "5xx", "other"))),
        ("goodput (req/s meeting the SLO)", f"{s['goodput_rps']:.2f}"),
        ("requests / seconds", f"{s['requests']} / {s['duration_s']:.0f}"),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.report")
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--slo", type=Path, default=Path(__file__).with_name("slo.yml"))
    args = ap.parse_args(argv)
    slo = yaml.safe_load(args.slo.read_text())
    try:
        summary = summarise(args.dir, slo)
    except FileNotFoundError as e:
        print(f"error: {e.filename} is missing: did the load test run?", file=sys.stderr)
        return 2
    (args.dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(render(summary))
    misses = gate(summary, slo.get("thresholds", {}))
    for m in misses:
        print(f"SLO MISSED: {m}")
    print(f"report: {args.dir / 'locust.html'}")
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
