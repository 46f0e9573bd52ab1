"""Render the project's templates outside Ansible (local mode, tests) exactly as Ansible does:
same files, same role defaults, Jinja2 with Ansible's template settings."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jinja2
import yaml

from stack.declaration import ROOT

ROLES = ROOT / "ansible" / "roles"

# Ansible's template module: trim_blocks on, trailing newline kept, undefined is an error
_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(ROOT)), undefined=jinja2.StrictUndefined,
    trim_blocks=True, keep_trailing_newline=True, autoescape=False,
)


def role_defaults(*roles: str) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for role in roles:
        merged.update(yaml.safe_load((ROLES / role / "defaults" / "main.yml").read_text()) or {})
    return merged


def resolve(variables: dict[str, Any]) -> dict[str, Any]:
    """Expand "{{ other_var }}" in string values, as Ansible does lazily."""
    out = dict(variables)
    for _ in range(5):
        changed = False
        for k, v in out.items():
            if isinstance(v, str) and "{{" in v:
                try:
                    new = _ENV.from_string(v).render(out)
                except jinja2.UndefinedError:
                    continue  # needs an Ansible-only variable (playbook_dir ...): unused here
                changed |= new != v
                out[k] = new
        if not changed:
            break
    return out


def render(template: str, variables: dict[str, Any]) -> str:
    """`template` is a path relative to the repository root."""
    return _ENV.get_template(template).render(variables)


def write(path: Path, text: str, mode: int = 0o640) -> bool:
    """Write only when the content changes; True if it did (a handler would fire)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.read_text() == text:
        return False
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    tmp.replace(path)
    return True


def parse_unit_file(text: str) -> dict[tuple[str, str], list[str]]:
    """A systemd unit file as {(section, key): [values]}, continuation lines joined and runs of
    spaces collapsed (comments and blanks skipped)."""
    out: dict[tuple[str, str], list[str]] = {}
    section = ""
    for line in re.sub(r"\\\n", " ", text).splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault((section, key), []).append(" ".join(value.split()))
    return out


def parse_env_file(text: str) -> dict[str, str]:
    """KEY=VALUE lines of a systemd EnvironmentFile (comments and blanks skipped)."""
    env = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env
