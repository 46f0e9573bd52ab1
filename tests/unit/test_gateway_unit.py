"""The gateway's systemd unit and config as the gateway role renders them from its defaults and
the model declaration: file limits sized for the promised concurrency, a stop timeout that
covers the notice and drain periods, a config the app accepts."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import jinja2
import pytest
import yaml

from app.config import load_config
from tests.unit.test_role_templates import ROLES, ROOT, role_vars

DECLARED = yaml.safe_load((ROOT / "ansible/group_vars/all/models.yml").read_text())["llm_models"]


def gateway_vars(**overrides) -> dict:
    return role_vars("gateway", **{"role_path": str(ROLES / "gateway"), "llm_models": DECLARED,
                                   **overrides})


def render(path: Path, values: dict) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(path.parent), trim_blocks=True,
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.get_template(path.name).render(values)


def unit(**overrides) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read_string(render(ROOT / "systemd/gateway.service.j2", gateway_vars(**overrides)))
    return parser["Service"]


def test_the_file_limit_covers_four_sockets_per_promised_request_slot():
    slots = sum(m["max_concurrency"] for m in DECLARED)
    assert int(unit()["LimitNOFILE"]) >= max(8192, 4 * slots + 1024)
    # it grows with the declaration rather than staying a fixed guess
    big = [dict(m, max_concurrency=3000) for m in DECLARED]
    assert int(unit(llm_models=big)["LimitNOFILE"]) == 4 * 3000 * len(DECLARED) + 1024


@pytest.mark.parametrize("notice, drain", [(5, 30), (60, 30), (0, 0)])
def test_systemd_waits_for_the_notice_the_drain_and_the_closing_events(notice, drain):
    stop = int(unit(gateway_drain_notice_s=notice, gateway_drain_timeout_s=drain)
               ["TimeoutStopSec"])
    assert stop >= notice + drain + 2 + 10  # 2 s for streams' error events, 10 s to spare


def test_the_rendered_config_is_one_the_gateway_accepts(tmp_path):
    values = gateway_vars(gateway_drain_notice_s=7)
    cfg = tmp_path / "gateway.yml"
    cfg.write_text(render(ROLES / "gateway/templates/gateway.yml.j2", values))
    loaded = load_config(cfg)
    assert loaded.drain_notice_s == 7
    assert loaded.drain_timeout_s == values["gateway_drain_timeout_s"]
    assert [m.name for m in loaded.models] == [m["name"] for m in DECLARED]


def test_the_default_notice_outlasts_the_load_balancers_detection():
    tf = (ROOT / "terraform/modules/load_balancer/main.tf").read_text()
    check = re.search(r"health_check \{(.*?)\n  \}", tf, re.S).group(1)
    interval = int(re.search(r"\binterval\s*=\s*(\d+)", check).group(1))
    failures = int(re.search(r"\bunhealthy_threshold\s*=\s*(\d+)", check).group(1))
    assert gateway_vars()["gateway_drain_notice_s"] > interval * failures


def test_local_mode_has_no_load_balancer_to_wait_for():
    from stack import declaration, local

    rendered = local.render("ansible/roles/gateway/templates/gateway.yml.j2",
                            local.variables(declaration.load()))
    assert yaml.safe_load(rendered)["drain_notice_s"] == 0
