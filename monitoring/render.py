"""Render monitoring/prometheus.yml.j2 (and alertmanager.yml.j2) outside Ansible: local mode,
`make monitoring-check` and the tests.

    python -m monitoring.render --out .local/run/monitoring/prometheus.yml [--scrape-interval 5s]
    python -m monitoring.render --alertmanager-examples .local/run/monitoring/alertmanager

The scrape targets come from the same places Ansible takes them from: the model declaration
(one vLLM target per model) and the roles' defaults (gateway port, node and dcgm exporter
listen addresses). Local mode has one host, this machine, on 127.0.0.1 and without a GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from stack import declaration
from stack.render import render, resolve, role_defaults, write

ROOT = declaration.ROOT
TEMPLATE = "monitoring/prometheus.yml.j2"
ALERTMANAGER_TEMPLATE = "monitoring/alertmanager.yml.j2"
RULES_DIR = ROOT / "monitoring" / "rules"
LOCAL_HOST = {"name": "local", "address": "127.0.0.1", "gpu": False, "local": True}


def variables(targets: list[dict[str, Any]], **overrides: Any) -> dict[str, Any]:
    """Role defaults, the declared models, then `overrides` (any template variable)."""
    v = role_defaults("gateway", "node_exporter", "dcgm_exporter")
    v.update({
        "llm_models": [m.model_dump() for m in declaration.load()],
        "monitoring_targets": targets,
        "monitoring_rules_dir": str(RULES_DIR),
    })
    v.update(overrides)
    return v


def render_config(targets: list[dict[str, Any]] | None = None, **overrides: Any) -> str:
    return render(TEMPLATE, variables(targets or [LOCAL_HOST], **overrides))


def render_alertmanager(**overrides: Any) -> str:
    """Alertmanager's config from the monitoring role's defaults, then `overrides`."""
    v = resolve({k: val for k, val in role_defaults("monitoring").items()
                 if k.startswith("monitoring_alert")})
    v.update(overrides)
    return render(ALERTMANAGER_TEMPLATE, v)


# One config per receiver, with made-up settings of the right shape: what `make
# monitoring-check` hands to amtool.
ALERTMANAGER_EXAMPLES: dict[str, dict[str, Any]] = {
    "none": {},
    "sns": {"monitoring_alert_receiver": "sns",
            "monitoring_alert_sns_topic_arn": "arn:aws:sns:us-east-1:123456789012:llm-alerts"},
    "email": {"monitoring_alert_receiver": "email",
              "monitoring_alert_email_smarthost": "smtp.example.com:587",
              "monitoring_alert_email_from": "alerts@example.com",
              "monitoring_alert_email_to": "oncall@example.com",
              "monitoring_alert_email_username": "alerts",
              "monitoring_alert_email_password": "not-a-real-password"},
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m monitoring.render",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="where to write prometheus.yml")
    ap.add_argument("--alertmanager-examples", type=Path, metavar="DIR",
                    help="write alertmanager-<receiver>.yml for every receiver into DIR")
    ap.add_argument("--scrape-interval", default="5s")
    ap.add_argument("--prometheus-listen", default="127.0.0.1:9090",
                    help="this Prometheus' own address (it scrapes itself)")
    ap.add_argument("--node-exporter", default="127.0.0.1:9100", help="node exporter address")
    args = ap.parse_args(argv)
    if args.alertmanager_examples:
        for receiver, overrides in ALERTMANAGER_EXAMPLES.items():
            path = args.alertmanager_examples / f"alertmanager-{receiver}.yml"
            write(path, render_alertmanager(**overrides), mode=0o600)
            print(path)
    if not args.out:
        if not args.alertmanager_examples:
            ap.error("give --out, --alertmanager-examples or both")
        return 0
    try:
        text = render_config(monitoring_scrape_interval=args.scrape_interval,
                             monitoring_prometheus_listen=args.prometheus_listen,
                             node_exporter_listen=args.node_exporter)
    except declaration.DeclarationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    changed = write(args.out, text, mode=0o644)
    print(f"{args.out}: {'written' if changed else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
