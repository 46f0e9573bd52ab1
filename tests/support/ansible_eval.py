"""Expressions evaluated the way Ansible's own templating evaluates them in a role's task."""

from __future__ import annotations

from typing import Any

import yaml
from ansible.parsing.dataloader import DataLoader
from ansible.template import Templar, trust_as_template

from stack.render import ROLES


def trusted(value: Any) -> Any:
    """Values read from the role's YAML, marked as templates Ansible may render (as it marks
    the files it loads itself)."""
    if isinstance(value, str):
        return trust_as_template(value)
    if isinstance(value, list):
        return [trusted(v) for v in value]
    if isinstance(value, dict):
        return {k: trusted(v) for k, v in value.items()}
    return value


def render(expr: Any, variables: dict[str, Any]) -> Any:
    """`expr` (a string or a structure of them, read from a role) with these variables."""
    return Templar(loader=DataLoader(), variables=variables).template(trusted(expr))


def role_value(role: str, expr: str, **host: Any) -> Any:
    """`expr` as a task of `role` sees it (its defaults and vars), on a host with these
    variables (facts, registered results, inventory values)."""
    variables: dict[str, Any] = {}
    for part in ("defaults", "vars"):
        path = ROLES / role / part / "main.yml"
        if path.exists():
            variables.update(yaml.safe_load(path.read_text()) or {})
    return render(expr, {**trusted(variables), **host})
