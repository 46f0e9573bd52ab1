"""Files the GPU-side roles render, checked without a GPU: rendered with Jinja2 the way Ansible's
template module renders them (StrictUndefined, trim_blocks) from the roles' own defaults and
vars, then read the way their consumers read them.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import jinja2
import pytest
import yaml

from stack.render import parse_unit_file

ROOT = Path(__file__).resolve().parents[2]
ROLES = ROOT / "ansible" / "roles"
OUR_ROLES = ("models", "nvidia_driver", "dcgm_exporter", "node_exporter")

# What the GPU alert rules and dashboards (monitoring/) query. Throttling may carry either the
# current name or its deprecated alias (both are DCGM field 112).
ALERT_FIELDS = {
    "DCGM_FI_DEV_GPU_TEMP",
    "DCGM_FI_DEV_POWER_USAGE",
    "DCGM_FI_DEV_FB_USED",
    "DCGM_FI_DEV_FB_FREE",
    "DCGM_FI_DEV_GPU_UTIL",
    "DCGM_FI_DEV_XID_ERRORS",
    "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL",
    "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
    "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
    "DCGM_FI_PROF_DRAM_ACTIVE",
}
THROTTLE_FIELDS = {"DCGM_FI_DEV_CLOCKS_EVENT_REASONS", "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS"}
# The Prometheus types dcgm-exporter accepts in a counters file.
EXPORTER_TYPES = {"gauge", "counter", "histogram", "summary", "label"}


def env(role: str) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(ROLES / role / "templates"),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        keep_trailing_newline=True,
    )


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def role_vars(role: str, **overrides) -> dict:
    """defaults/main.yml, then vars/main.yml, then overrides; `{{ }}` in values resolved."""
    values = load_yaml(ROLES / role / "defaults" / "main.yml")
    vars_file = ROLES / role / "vars" / "main.yml"
    if vars_file.exists():
        values.update(load_yaml(vars_file))
    values.update(overrides)
    e = jinja2.Environment(undefined=jinja2.StrictUndefined)

    def resolve(value, ctx):
        if isinstance(value, str) and "{{" in value:
            try:
                return e.from_string(value).render(ctx)
            except (jinja2.UndefinedError, jinja2.TemplateAssertionError):
                # needs a fact or result only a host has, or an Ansible filter: see
                # test_gpu_roles.py, which evaluates those with Ansible itself
                return value
        if isinstance(value, list):
            return [resolve(v, ctx) for v in value]
        return value

    for _ in range(5):  # defaults may refer to other defaults
        values = {k: resolve(v, values) for k, v in values.items()}
    return values


def render(role: str, template: str, **overrides) -> str:
    return env(role).get_template(template).render(role_vars(role, **overrides))


def counter_rows(text: str) -> list[list[str]]:
    """Read a counters file as dcgm-exporter does: CSV, '#' comments, fields trimmed."""
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return [[f.strip(" ") for f in row] for row in csv.reader(lines)]


# --- dcgm_exporter: counters file -------------------------------------------------------------


@pytest.fixture(scope="module")
def counters() -> str:
    return render("dcgm_exporter", "dcgm-counters.csv.j2", gpu_enabled=True)


def test_counters_file_enables_every_field_the_alerts_need(counters):
    enabled = {row[0] for row in counter_rows(counters)}
    assert ALERT_FIELDS <= enabled, ALERT_FIELDS - enabled
    assert enabled & THROTTLE_FIELDS


def test_counters_rows_have_three_columns_a_known_type_and_a_dcgm_name(counters):
    rows = counter_rows(counters)
    assert len(rows) >= len(ALERT_FIELDS)
    for row in rows:
        assert len(row) == 3, row
        name, kind, help_text = row
        assert re.fullmatch(r"DCGM_(FI|EXP)_[A-Z0-9_]+", name), row
        assert kind in EXPORTER_TYPES, row
        assert help_text and '"' not in help_text, row
    names = [row[0] for row in rows]
    assert len(names) == len(set(names)), "a field is listed twice"


def test_ecc_and_xid_carry_the_types_their_alerts_assume(counters):
    types = {row[0]: row[1] for row in counter_rows(counters)}
    assert types["DCGM_FI_DEV_ECC_SBE_VOL_TOTAL"] == "counter"
    assert types["DCGM_FI_DEV_ECC_DBE_VOL_TOTAL"] == "counter"
    # the last XID seen, not a count: rules must not rate() it
    assert types["DCGM_FI_DEV_XID_ERRORS"] == "gauge"
    xid_line = counters.index("DCGM_FI_DEV_XID_ERRORS,")
    assert "LAST XID" in counters[counters.rindex("\n#", 0, xid_line):xid_line]


def test_counters_file_lists_exactly_the_exported_field_list(counters):
    fields = load_yaml(ROLES / "dcgm_exporter" / "vars" / "main.yml")["dcgm_exporter_fields"]
    assert [row[0] for row in counter_rows(counters)] == [f["name"] for f in fields]
    ids = [f["id"] for f in fields]
    assert len(ids) == len(set(ids)), "two names for one DCGM field"


def test_site_fields_are_appended_under_their_own_heading():
    extra = [{"name": "DCGM_FI_DEV_PCIE_TX_THROUGHPUT", "type": "counter", "help": "PCIe TX."}]
    text = render("dcgm_exporter", "dcgm-counters.csv.j2", gpu_enabled=True,
                  dcgm_exporter_extra_fields=extra)
    assert counter_rows(text)[-1] == ["DCGM_FI_DEV_PCIE_TX_THROUGHPUT", "counter", "PCIe TX."]
    assert "\n# Site\n" in text


# --- dcgm_exporter: unit ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def exporter_unit() -> dict[tuple[str, str], list[str]]:
    return parse_unit_file(render("dcgm_exporter", "dcgm-exporter.service.j2", gpu_enabled=True))


def test_exporter_unit_starts_after_and_requires_the_dcgm_host_engine(exporter_unit):
    assert "nvidia-dcgm.service" in exporter_unit[("Unit", "After")][0].split()
    assert "nvidia-dcgm.service" in exporter_unit[("Unit", "Requires")][0].split()


def test_exporter_unit_listens_on_9400_with_our_counters_through_the_host_engine(exporter_unit):
    (cmd,) = exporter_unit[("Service", "ExecStart")]
    argv = cmd.split()
    assert argv[0] == "/usr/bin/dcgm-exporter"
    assert argv[argv.index("--address") + 1] == ":9400"
    assert argv[argv.index("--collectors") + 1] == "/etc/dcgm-exporter/llm-counters.csv"
    assert argv[argv.index("--remote-hostengine-info") + 1] == "localhost:5555"
    assert exporter_unit[("Install", "WantedBy")] == ["multi-user.target"]


def test_exporter_unit_runs_unprivileged(exporter_unit):
    assert exporter_unit[("Service", "DynamicUser")] == ["yes"]
    assert exporter_unit[("Service", "CapabilityBoundingSet")] == [""]
    assert exporter_unit[("Service", "NoNewPrivileges")] == ["yes"]


def test_extra_exporter_flags_stay_on_the_command_line():
    text = render("dcgm_exporter", "dcgm-exporter.service.j2", gpu_enabled=True,
                  dcgm_exporter_extra_args="--web-config-file /etc/dcgm-exporter/web.yml")
    (cmd,) = parse_unit_file(text)[("Service", "ExecStart")]
    assert cmd.endswith("--remote-hostengine-info localhost:5555 "
                        "--web-config-file /etc/dcgm-exporter/web.yml")
    assert ("Service", "Restart") in parse_unit_file(text)


# --- the other roles' rendered pieces ---------------------------------------------------------


def test_node_exporter_listens_on_all_interfaces_port_9100_by_default():
    text = render("node_exporter", "prometheus-node-exporter.default.j2")
    assert 'ARGS="--web.listen-address=0.0.0.0:9100"' in text.splitlines()
    text = render("node_exporter", "prometheus-node-exporter.default.j2",
                  node_exporter_extra_args=["--collector.systemd"])
    assert 'ARGS="--web.listen-address=0.0.0.0:9100 --collector.systemd"' in text.splitlines()


def test_models_volume_is_mounted_by_label_at_the_models_dir():
    unit = parse_unit_file(render("models", "models.mount.j2"))
    assert unit[("Mount", "What")] == ["/dev/disk/by-label/models"]
    assert unit[("Mount", "Where")] == ["/srv/models"]
    assert unit[("Mount", "Type")] == ["xfs"]
    assert "nofail" in unit[("Mount", "Options")][0].split(",")


def test_models_dir_default_matches_the_vllm_role():
    models = load_yaml(ROLES / "models" / "defaults" / "main.yml")
    vllm = load_yaml(ROLES / "vllm" / "defaults" / "main.yml")
    assert models["models_dir"] == vllm["vllm_models_dir"] == "/srv/models"


@pytest.mark.parametrize("version, arch, path", [
    ("22.04", "x86_64", "ubuntu2204/x86_64"),
    ("24.04", "x86_64", "ubuntu2404/x86_64"),
    ("24.04", "aarch64", "ubuntu2404/sbsa"),
])
def test_nvidia_repository_url_follows_the_distro_and_architecture(version, arch, path):
    facts = {"distribution_version": version, "architecture": arch}
    url = role_vars("dcgm_exporter", ansible_facts=facts)["dcgm_exporter_cuda_repo_url"]
    assert url == f"https://developer.download.nvidia.com/compute/cuda/repos/{path}"


def test_gpu_roles_follow_the_host_wide_gpu_switch():
    facts = {"distribution_version": "22.04", "architecture": "x86_64"}
    for role, var in (("nvidia_driver", "nvidia_driver_enabled"),
                      ("dcgm_exporter", "dcgm_exporter_enabled")):
        assert role_vars(role, gpu_enabled=False, ansible_facts=facts)[var] == "False"
        assert role_vars(role, gpu_enabled=True, ansible_facts=facts)[var] == "True"


@pytest.mark.parametrize("role", OUR_ROLES)
def test_every_default_is_declared_in_the_argument_specs(role):
    defaults = load_yaml(ROLES / role / "defaults" / "main.yml")
    specs = load_yaml(ROLES / role / "meta" / "argument_specs.yml")
    options = specs["argument_specs"]["main"]["options"]
    assert set(defaults) <= set(options), set(defaults) - set(options)
    for name, spec in options.items():
        if "default" in spec and name in defaults and "{{" not in str(defaults[name]):
            assert spec["default"] == defaults[name], name
