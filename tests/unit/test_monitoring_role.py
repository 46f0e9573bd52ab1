"""The monitoring role without a host: its defaults agree with its argument specs and with the
roles it scrapes, its default targets follow the gpu_hosts group, and the scrape config it
renders from monitoring/prometheus.yml.j2 with its own variables is one promtool accepts.

Values are resolved the way Ansible resolves them: `{{ }}` in defaults evaluated lazily to
native types (jinja2's NativeEnvironment), templates rendered with StrictUndefined and
trim_blocks like the template module.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import jinja2
import jinja2.nativetypes
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ROLES = ROOT / "ansible" / "roles"
ROLE = ROLES / "monitoring"
MODELS_FILE = ROOT / "ansible" / "group_vars" / "all" / "models.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool missing: `make deps` installs the Debian prometheus package")
AMTOOL = shutil.which("amtool")
needs_amtool = pytest.mark.skipif(
    AMTOOL is None,
    reason="amtool missing: `make deps` installs the Debian prometheus-alertmanager package")

# argument_specs type -> the Python type a literal default of that type has
SPEC_TYPES = {"str": str, "path": str, "int": int, "bool": bool, "list": list, "dict": dict}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def defaults() -> dict[str, Any]:
    return load_yaml(ROLE / "defaults" / "main.yml")


def spec_options() -> dict[str, dict]:
    return load_yaml(ROLE / "meta" / "argument_specs.yml")["argument_specs"]["main"]["options"]


def is_templated(value: Any) -> bool:
    return isinstance(value, str) and "{{" in value


def _ansible_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on", "y", "t")
    return bool(value)


def native_env() -> jinja2.nativetypes.NativeEnvironment:
    env = jinja2.nativetypes.NativeEnvironment(undefined=jinja2.StrictUndefined)
    env.filters["bool"] = _ansible_bool
    return env


def inventory_context(monitoring_host: str, gpu_hosts: dict[str, dict]) -> dict[str, Any]:
    """What Ansible offers a role's defaults: groups, hostvars, inventory_hostname, role_path."""
    return {
        "groups": {"gpu_hosts": list(gpu_hosts), "monitoring": [monitoring_host]},
        "hostvars": gpu_hosts,
        "inventory_hostname": monitoring_host,
        "role_path": str(ROLE),
    }


def role_vars(context: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """The role's defaults with `{{ }}` resolved against `context` and each other."""
    env = native_env()
    values = {**defaults(), **overrides}
    for _ in range(5):  # defaults may refer to other defaults
        scope = {**context, **values}
        values = {k: env.from_string(v).render(scope) if is_templated(v) else v
                  for k, v in values.items()}
    assert not [k for k, v in values.items() if is_templated(v)], "unresolved defaults"
    return values


def scrape_config_task() -> dict:
    tasks = load_yaml(ROLE / "tasks" / "prometheus.yml")
    return next(t for t in tasks if str(t.get("ansible.builtin.template", {}).get("src", ""))
                .endswith("/prometheus.yml.j2"))


def render_scrape_config(variables: dict[str, Any]) -> str:
    """Render monitoring/prometheus.yml.j2 as the role's template task does, with its `vars:`."""
    task = scrape_config_task()
    native = native_env()
    task_vars = {k: native.from_string(str(v)).render(variables) for k, v in task["vars"].items()}
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(ROOT)),
                             undefined=jinja2.StrictUndefined, trim_blocks=True,
                             keep_trailing_newline=True)
    models = load_yaml(MODELS_FILE)["llm_models"]
    return env.get_template("monitoring/prometheus.yml.j2").render(
        {**variables, "llm_models": models, **task_vars})


def render_role_template(name: str, variables: dict[str, Any]) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(ROLE / "templates")),
                             undefined=jinja2.StrictUndefined, trim_blocks=True,
                             keep_trailing_newline=True)
    return env.get_template(name).render(variables)


SAME_HOST = inventory_context("gpu1", {"gpu1": {"ansible_host": "203.0.113.10",
                                                "gpu_enabled": True}})


# ------------------------------------------------------------------ defaults and specs


def test_every_default_is_declared_in_the_argument_specs_and_every_role_option_has_one():
    role_options = {k for k in spec_options() if k.startswith("monitoring_")}
    assert set(defaults()) == role_options


def test_literal_defaults_equal_the_spec_defaults_and_templated_ones_declare_none():
    options = spec_options()
    for name, value in defaults().items():
        if is_templated(value):
            assert "default" not in options[name], name
        else:
            assert options[name].get("default") == value, name


def test_literal_defaults_have_the_declared_types():
    options = spec_options()
    for name, value in defaults().items():
        if not is_templated(value):
            assert isinstance(value, SPEC_TYPES[options[name]["type"]]), name


def test_role_prefixes_every_variable_it_defines():
    internals = load_yaml(ROLE / "vars" / "main.yml")
    assert all(k.startswith("monitoring_") for k in [*defaults(), *internals])


def test_scraped_ports_follow_the_scraped_roles_defaults():
    d = defaults()
    gateway = load_yaml(ROLES / "gateway" / "defaults" / "main.yml")
    node = load_yaml(ROLES / "node_exporter" / "defaults" / "main.yml")
    dcgm = load_yaml(ROLES / "dcgm_exporter" / "defaults" / "main.yml")
    assert d["monitoring_gateway_port"] == gateway["gateway_port"]
    assert str(d["monitoring_node_exporter_port"]) == node["node_exporter_listen"].split(":")[-1]
    assert str(d["monitoring_dcgm_exporter_port"]) == dcgm["dcgm_exporter_listen"].split(":")[-1]


def test_grafana_is_on_by_default_on_loopback_with_no_password_in_the_defaults():
    d = defaults()
    assert d["monitoring_grafana_enabled"] is True
    assert d["monitoring_grafana_listen"].startswith("127.0.0.1:")
    assert d["monitoring_prometheus_listen"] == "127.0.0.1:9090"
    assert d["monitoring_grafana_admin_password"] == ""
    assert spec_options()["monitoring_grafana_admin_password"]["no_log"] is True


# ------------------------------------------------------------------ targets from the inventory


def test_default_targets_scrape_prometheus_own_host_on_loopback():
    assert role_vars(SAME_HOST)["monitoring_targets"] == [
        {"name": "gpu1", "address": "127.0.0.1", "gpu": True, "local": True}]


def test_default_targets_of_peers_use_the_private_address_then_ansible_host_then_the_name():
    ctx = inventory_context("mon1", {
        "gpu1": {"ansible_host": "203.0.113.10", "aws_private_ip": "10.0.1.10",
                 "gpu_enabled": True},
        "gpu2": {"ansible_host": "10.0.1.11", "aws_private_ip": "", "gpu_enabled": "false"},
        "gpu3": {},
    })
    assert role_vars(ctx)["monitoring_targets"] == [
        {"name": "gpu1", "address": "10.0.1.10", "gpu": True, "local": False},
        {"name": "gpu2", "address": "10.0.1.11", "gpu": False, "local": False},
        {"name": "gpu3", "address": "gpu3", "gpu": True, "local": False},
    ]


# two GPU hosts as `make inventory` writes them: public ansible_host, private aws_private_ip,
# Prometheus on the first
TWO_HOSTS = inventory_context("gpu1", {
    "gpu1": {"ansible_host": "203.0.113.10", "aws_private_ip": "10.0.1.10", "gpu_enabled": True},
    "gpu2": {"ansible_host": "203.0.113.11", "aws_private_ip": "10.0.1.11", "gpu_enabled": True},
})


def test_the_default_targets_pass_the_roles_own_argument_check():
    """Ansible checks monitoring_targets against the spec's suboptions before the role runs:
    a field the default gives but the spec lacks stops every deploy there."""
    allowed = spec_options()["monitoring_targets"]["options"]
    for target in role_vars(TWO_HOSTS)["monitoring_targets"]:
        assert set(target) <= set(allowed), set(target) - set(allowed)
        assert {n for n, o in allowed.items() if o.get("required")} <= set(target)


def test_the_listener_port_is_the_nginx_setting_the_group_vars_give_every_play():
    group_vars = load_yaml(ROOT / "ansible" / "group_vars" / "all" / "main.yml")
    assert role_vars(TWO_HOSTS)["monitoring_metrics_listener_port"] == 9180
    assert role_vars({**TWO_HOSTS, "nginx_metrics_port": 9999})[
        "monitoring_metrics_listener_port"] == 9999
    assert group_vars["nginx_metrics_port"] == 9180


# ------------------------------------------------------------------ rendered files


@pytest.fixture()
def rules_dir(tmp_path: Path) -> Path:
    """The rule folder as the role fills it: every monitoring/rules/*.rules.yml, same names."""
    rules = tmp_path / "rules"
    rules.mkdir()
    for f in sorted((ROOT / "monitoring" / "rules").glob("*.rules.yml")):
        shutil.copy(f, rules / f.name)
    return rules


def test_scrape_config_uses_the_role_ports_and_rule_folder(rules_dir):
    v = role_vars(SAME_HOST, monitoring_rules_dir=str(rules_dir))
    cfg = yaml.safe_load(render_scrape_config(v))
    assert cfg["rule_files"] == [f"{rules_dir}/*.rules.yml"]
    assert cfg["global"]["scrape_interval"] == v["monitoring_scrape_interval"]
    targets = {j["job_name"]: [t for sc in j["static_configs"] for t in sc["targets"]]
               for j in cfg["scrape_configs"]}
    assert targets["prometheus"] == ["127.0.0.1:9090"]
    assert targets["gateway"] == ["127.0.0.1:8080"]
    assert targets["node"] == ["127.0.0.1:9100"]
    assert targets["dcgm"] == ["127.0.0.1:9400"]
    models = load_yaml(MODELS_FILE)["llm_models"]
    assert targets["vllm"] == [f"127.0.0.1:{m['port']}" for m in models]


def scrape_jobs(config: str) -> dict[str, list[tuple[str, dict]]]:
    """{job: [(target, labels)]} of a rendered scrape config."""
    cfg = yaml.safe_load(config)
    return {j["job_name"]: [(t, sc.get("labels", {})) for sc in j["static_configs"]
                            for t in sc["targets"]]
            for j in cfg["scrape_configs"]}


def test_peers_are_scraped_at_their_private_address_and_their_gateway_and_vllm_through_nginx(
        rules_dir):
    jobs = scrape_jobs(render_scrape_config(role_vars(TWO_HOSTS,
                                                      monitoring_rules_dir=str(rules_dir))))
    models = load_yaml(MODELS_FILE)["llm_models"]
    assert jobs["gateway"] == [
        ("127.0.0.1:8080", {"host": "gpu1"}),
        ("10.0.1.11:9180", {"host": "gpu2", "__metrics_path__": "/gateway/metrics"})]
    assert jobs["vllm"] == [
        *[(f"127.0.0.1:{m['port']}",
           {"host": "gpu1", "model": m["name"], "task": m.get("task", "generate")})
          for m in models],
        *[("10.0.1.11:9180",
           {"host": "gpu2", "model": m["name"], "task": m.get("task", "generate"),
            "__metrics_path__": f"/vllm/{m['name']}/metrics"}) for m in models]]
    # the exporters of the peer: its private address, their own ports, their default path
    assert jobs["node"] == [("127.0.0.1:9100", {"host": "gpu1"}),
                            ("10.0.1.11:9100", {"host": "gpu2"})]
    assert jobs["dcgm"] == [("127.0.0.1:9400", {"host": "gpu1"}),
                            ("10.0.1.11:9400", {"host": "gpu2"})]
    # the firewall drops scrapes from outside the VPC: never a public address
    assert "203.0.113" not in render_scrape_config(role_vars(TWO_HOSTS))


def test_a_single_host_scrapes_everything_on_loopback_without_the_listener(rules_dir):
    config = render_scrape_config(role_vars(SAME_HOST, monitoring_rules_dir=str(rules_dir)))
    assert "__metrics_path__" not in config and ":9180" not in config


@needs_promtool
@pytest.mark.parametrize("context", [
    SAME_HOST,
    TWO_HOSTS,
    inventory_context("mon1", {"gpu1": {"ansible_host": "10.0.1.10", "gpu_enabled": False},
                               "gpu2": {"ansible_host": "10.0.1.11"}}),
], ids=["prometheus-on-the-gpu-host", "two-gpu-hosts", "separate-host-mixed-gpus"])
def test_promtool_accepts_the_rendered_scrape_config_and_its_rules(context, rules_dir, tmp_path):
    config = tmp_path / "prometheus.yml"
    config.write_text(render_scrape_config(role_vars(context,
                                                     monitoring_rules_dir=str(rules_dir))))
    out = subprocess.run([PROMTOOL, "check", "config", str(config)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    # promtool also checked every rule file the config loads (an empty glob would pass too)
    n_rules = len(list(rules_dir.glob("*.rules.yml")))
    assert n_rules and f"SUCCESS: {n_rules} rule files found" in out.stdout, out.stdout


def test_prometheus_flags_listen_on_the_knob_and_carry_the_retention():
    text = render_role_template("prometheus.default.j2", role_vars(SAME_HOST))
    args = next(ln for ln in text.splitlines() if ln.startswith("ARGS=")).split("=", 1)[1]
    assert args.strip('"').split() == [
        "--config.file=/etc/prometheus/prometheus.yml",
        "--web.listen-address=127.0.0.1:9090",
        "--storage.tsdb.retention.time=15d",
    ]
    sized = render_role_template("prometheus.default.j2", role_vars(
        SAME_HOST, monitoring_prometheus_retention_size="20GB",
        monitoring_prometheus_extra_args=["--web.enable-admin-api"]))
    assert "--storage.tsdb.retention.size=20GB --web.enable-admin-api\"" in sized


def test_grafana_ini_listens_on_the_knob_and_quotes_the_password():
    text = render_role_template("grafana.ini.j2", role_vars(
        SAME_HOST, monitoring_grafana_admin_password="p;a#ss"))
    lines = [ln.strip() for ln in text.splitlines()]
    assert "http_addr = 127.0.0.1" in lines
    assert "http_port = 3000" in lines
    assert 'admin_password = """p;a#ss"""' in lines


def _tasks_in_order(tasks: list) -> list[dict]:
    """Tasks of a task file in run order, blocks flattened."""
    out = []
    for task in tasks or []:
        if "block" in task:
            out += _tasks_in_order(task["block"])
        else:
            out.append(task)
    return out


def test_deb822_repository_runs_only_after_python3_debian_is_installed():
    # the module needs python3-debian on the host; Ubuntu's cloud images do not have it
    users = 0
    for path in sorted(ROLES.glob("*/tasks/*.yml")):
        tasks = _tasks_in_order(load_yaml(path))
        for i, task in enumerate(tasks):
            if not any(k in task for k in ("ansible.builtin.deb822_repository",
                                           "deb822_repository")):
                continue
            users += 1
            before = [t.get("ansible.builtin.apt", {}) for t in tasks[:i]]
            names = [n for apt in before for n in
                     ([apt["name"]] if isinstance(apt.get("name"), str) else apt.get("name", []))]
            assert "python3-debian" in names, f"{path.relative_to(ROOT)}: {task['name']}"
    assert users >= 1  # Grafana's repository


# ------------------------------------------------------------------ Alertmanager


def alertmanager_config_task() -> dict:
    tasks = load_yaml(ROLE / "tasks" / "alertmanager.yml")
    return next(t for t in tasks if str(t.get("ansible.builtin.template", {}).get("src", ""))
                .endswith("/alertmanager.yml.j2"))


def render_alertmanager_config(variables: dict[str, Any]) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(ROOT)),
                             undefined=jinja2.StrictUndefined, trim_blocks=True,
                             keep_trailing_newline=True)
    return env.get_template("monitoring/alertmanager.yml.j2").render(variables)


RECEIVERS = {
    "none": {},
    "sns": {"monitoring_alert_receiver": "sns",
            "monitoring_alert_sns_topic_arn": "arn:aws:sns:eu-west-1:123456789012:llm-alerts"},
    "email": {"monitoring_alert_receiver": "email",
              "monitoring_alert_email_smarthost": "email-smtp.eu-west-1.amazonaws.com:587",
              "monitoring_alert_email_from": "alerts@example.com",
              "monitoring_alert_email_to": "oncall@example.com, sre@example.com",
              "monitoring_alert_email_username": "AKIAEXAMPLE",
              "monitoring_alert_email_password": 'p"a:ss\\#word'},
}


def test_alerts_go_nowhere_by_default_and_the_smtp_password_is_a_secret():
    d = defaults()
    assert d["monitoring_alert_receiver"] == "none"
    assert set(spec_options()["monitoring_alert_receiver"]["choices"]) == {"sns", "email", "none"}
    assert d["monitoring_alert_email_password"] == ""
    assert spec_options()["monitoring_alert_email_password"]["no_log"] is True


def test_alertmanager_listens_on_loopback_with_clustering_off():
    text = render_role_template("alertmanager.default.j2", role_vars(SAME_HOST))
    args = next(ln for ln in text.splitlines() if ln.startswith("ARGS=")).split("=", 1)[1]
    assert args.strip('"').split() == [
        "--config.file=/etc/prometheus/alertmanager.yml",
        "--web.listen-address=127.0.0.1:9093",
        "--cluster.listen-address=",  # empty: no gossip port on 0.0.0.0:9094
    ]


def test_prometheus_sends_alerts_to_the_roles_alertmanager_and_scrapes_it(rules_dir):
    cfg = yaml.safe_load(render_scrape_config(role_vars(SAME_HOST,
                                                        monitoring_rules_dir=str(rules_dir))))
    assert cfg["alerting"]["alertmanagers"] == [{"static_configs": [
        {"targets": ["127.0.0.1:9093"]}]}]
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert jobs["alertmanager"]["static_configs"] == [{"targets": ["127.0.0.1:9093"]}]


def test_alertmanager_config_is_private_checked_by_amtool_and_its_secret_kept_out_of_logs():
    task = alertmanager_config_task()
    t = task["ansible.builtin.template"]
    assert (t["owner"], t["group"], t["mode"]) == ("root", "prometheus", "0640")
    assert t["validate"] == "amtool check-config %s"
    native = native_env()
    no_log = task["no_log"]
    assert native.from_string(no_log).render(monitoring_alert_email_password="x") is True
    assert native.from_string(no_log).render(monitoring_alert_email_password="") is False
    # the flags go in before the package, whose first start would otherwise use its own
    names = [next(iter(k for k in x if k.startswith("ansible.builtin."))) for x in
             load_yaml(ROLE / "tasks" / "alertmanager.yml")]
    assert names.index("ansible.builtin.template") < names.index("ansible.builtin.apt")


@pytest.mark.parametrize("receiver", list(RECEIVERS))
def test_the_rendered_config_routes_everything_to_the_one_receiver(receiver):
    cfg = yaml.safe_load(render_alertmanager_config(role_vars(SAME_HOST, **RECEIVERS[receiver])))
    assert cfg["route"]["receiver"] == receiver
    assert [r["name"] for r in cfg["receivers"]] == [receiver]
    assert cfg["route"]["group_by"] == ["alertname", "host", "model"]
    assert cfg["route"]["repeat_interval"] == "4h"
    if receiver == "sns":
        sns = cfg["receivers"][0]["sns_configs"][0]
        assert sns["topic_arn"] == RECEIVERS["sns"]["monitoring_alert_sns_topic_arn"]
        assert sns["sigv4"] == {"region": "eu-west-1"}  # no keys: the instance role signs
    if receiver == "email":
        assert cfg["global"]["smtp_auth_password"] == RECEIVERS["email"][
            "monitoring_alert_email_password"]
        assert cfg["global"]["smtp_require_tls"] is True
        to = cfg["receivers"][0]["email_configs"][0]["to"]
        assert to == "oncall@example.com, sre@example.com"
    if receiver == "none":
        assert "smtp_auth_password" not in cfg["global"]


@needs_amtool
@pytest.mark.parametrize("receiver", list(RECEIVERS))
def test_amtool_accepts_the_config_the_role_renders(receiver, tmp_path):
    config = tmp_path / "alertmanager.yml"
    config.write_text(render_alertmanager_config(role_vars(SAME_HOST, **RECEIVERS[receiver])))
    out = subprocess.run([AMTOOL, "check-config", str(config)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout and "- 1 receivers" in out.stdout, out.stdout
    assert "- 2 inhibit rules" in out.stdout, out.stdout
