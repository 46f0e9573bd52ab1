"""sshd hardening (common role), read the way sshd reads a drop-in."""

from __future__ import annotations

from pathlib import Path

import jinja2
import yaml

COMMON = Path(__file__).resolve().parents[2] / "ansible" / "roles" / "common"


def sshd_settings(**overrides) -> dict[str, str]:
    """keyword -> value as sshd takes them: keywords case-insensitive, the first one wins."""
    values = {**yaml.safe_load((COMMON / "defaults" / "main.yml").read_text()), **overrides}
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(COMMON / "templates"),
                             undefined=jinja2.StrictUndefined, trim_blocks=True)
    settings: dict[str, str] = {}
    for line in env.get_template("sshd-hardening.conf.j2").render(values).splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            settings.setdefault(key.lower(), value.strip())
    return settings


def test_an_operator_whose_agent_holds_five_keys_gets_in():
    # ssh offers each agent key in turn; every refused key uses one of MaxAuthTries, and sshd
    # disconnects once they are spent. Five keys, the right one last: five tries needed.
    tries = int(sshd_settings().get("maxauthtries", "6"))  # absent: OpenSSH's default, 6
    assert tries >= 5


def test_passwords_stay_off():
    s = sshd_settings()
    assert s["passwordauthentication"] == "no" and s["kbdinteractiveauthentication"] == "no"
    assert s["permitrootlogin"] == "prohibit-password"


def test_max_auth_tries_is_a_setting():
    assert sshd_settings(common_ssh_max_auth_tries=10)["maxauthtries"] == "10"
