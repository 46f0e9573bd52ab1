"""Pin each declared model's revision to a commit, in place.

    python -m stack.pin_models [--check] [FILE ...]      (make pin-models / make pin-models-check)

The declaration (ansible/group_vars/all/models.yml by default) refuses a branch or tag name as
`revision`: a branch moves under a running fleet. Write the branch or tag you want (`main`,
`v1.0`), then run this on a machine that reaches the Hugging Face hub: it asks the hub which
commit each such revision names (HfApi().model_info(repo, revision=...).sha) and writes that
commit back into the file. Only the revision values change: comments, quotes, order and
layout stay as they were (the file is edited as text, never re-dumped). Revisions that already
are 40-hex commits are left alone and cost no hub request, so a second run changes nothing.

Gated or private repositories need HF_TOKEN in the environment (huggingface_hub reads it).

--check asks no one: it exits 1 and names every revision that is not a commit yet.

Errors are one line per model on stderr, naming the repository; exit status 1. Revisions that
did resolve are still written.

Only the standard library, PyYAML and (for resolving) huggingface_hub are imported, so this
runs in the small venv `make pin-models` builds, without the gateway's dependencies.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

# the same file stack.declaration.DECLARATION names (not imported: that module needs pydantic)
DECLARATION = Path(__file__).resolve().parent.parent / "ansible" / "group_vars" / "all" \
    / "models.yml"
COMMIT = re.compile(r"[0-9a-f]{40}")
# Transport errors of huggingface_hub's HTTP stack (its 2.x uses httpx2) are not OSErrors.
HTTP_LIBS = ("httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3")

_SECTION = re.compile(r"^(?P<indent>[ ]*)llm_models:\s*(?:#.*)?$")
_ITEM = re.compile(r"^(?P<indent>[ ]*)-[ ]+")
_KEY = re.compile(
    r"(?P<key>hf_repo|revision):[ ]*"
    r"(?P<value>'[^'\n]*'|\"[^\"\n]*\"|[^\s#'\"][^\s#]*)"
    r"(?P<rest>[ \t]*(?:#.*)?)$")


class PinError(Exception):
    """A failure explained in one line for the operator."""


class ModelInfo(Protocol):
    sha: str | None


class Hub(Protocol):
    """What this tool needs of huggingface_hub.HfApi."""

    def model_info(self, repo_id: str, *, revision: str | None = None) -> ModelInfo: ...


@dataclass(frozen=True)
class Pin:
    """One model's revision as written in the file."""

    repo: str
    revision: str
    line: int  # 0-based index of the revision's line
    start: int  # column span of the value, quotes excluded
    end: int

    @property
    def pinned(self) -> bool:
        return bool(COMMIT.fullmatch(self.revision))


def _unquote(value: str) -> tuple[str, int]:
    """(value without quotes, length of the opening quote)."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1], 1
    return value, 0


def find_pins(text: str, source: str = "declaration") -> list[Pin]:
    """Every llm_models entry's hf_repo and revision, with where the revision is written.

    The text scan is checked against a real YAML parse of the same text, so a layout the scan
    does not understand (a flow-style entry, a value on its own line) is refused instead of
    silently skipped."""
    lines = text.splitlines(keepends=True)
    pins: list[Pin] = []
    section_indent: int | None = None
    item_indent: int | None = None
    key_col: int | None = None
    current: dict[str, Any] = {}

    def close() -> None:
        if "hf_repo" in current and "revision" in current:
            value, line, start, end = current["revision"]
            pins.append(Pin(current["hf_repo"], value, line, start, end))
        current.clear()

    for i, raw in enumerate(lines):
        line = raw.rstrip("\r\n")
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(line.lstrip(" "))
        if section_indent is None:
            m = _SECTION.match(line)
            if m:
                section_indent = len(m.group("indent"))
            continue
        item = _ITEM.match(line)
        if indent <= section_indent and not (item and indent == section_indent):
            break  # the next top-level key: llm_models is over
        if item and (item_indent is None or indent == item_indent):
            close()
            item_indent, key_col = indent, item.end()
            body_col = item.end()
        elif key_col is not None and indent == key_col:
            body_col = indent
        else:
            continue  # nested deeper inside an entry
        m = _KEY.match(line, body_col)
        if m and m.group("key") not in current:
            value, q = _unquote(m.group("value"))
            if m.group("key") == "hf_repo":
                current["hf_repo"] = value
            else:
                start = m.start("value") + q
                current["revision"] = (value, i, start, start + len(value))
    close()

    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise PinError(f"{source}: not valid YAML: {str(e).splitlines()[0]}") from None
    models = data.get("llm_models") if isinstance(data, dict) else None
    if not isinstance(models, list) or not models:
        raise PinError(f"{source}: no llm_models list")
    parsed = [(m.get("hf_repo"), str(m.get("revision"))) for m in models if isinstance(m, dict)]
    found = [(p.repo, p.revision) for p in pins]
    if parsed != found or len(parsed) != len(models):
        raise PinError(
            f"{source}: cannot locate every model's revision in the text (found {len(found)} of "
            f"{len(models)}); write each entry in block style, with `hf_repo: ORG/NAME` and "
            f"`revision: ...` each on its own line")
    return pins


def unpinned(pins: list[Pin]) -> list[Pin]:
    return [p for p in pins if not p.pinned]


def rewrite(text: str, commits: dict[int, str], pins: list[Pin]) -> str:
    """The text with the revisions on the given lines replaced by their commits."""
    lines = text.splitlines(keepends=True)
    for p in pins:
        if p.line in commits:
            line, sha = lines[p.line], commits[p.line]
            quoted = line[p.start - 1:p.start] in ("'", '"')
            if sha.isdigit() and not quoted:
                sha = f'"{sha}"'  # YAML would read an all-digit commit as a number
            lines[p.line] = line[:p.start] + sha + line[p.end:]
    return "".join(lines)


def explain(exc: BaseException) -> str | None:
    """One line for a huggingface_hub failure; None when it is not one (a bug: re-raised).

    Matched by class name (huggingface_hub.errors), so the caller need not import the hub."""
    names = {c.__name__ for c in type(exc).__mro__}
    if "GatedRepoError" in names:
        return ("gated repository: accept its terms on the hub with your account, then set "
                "HF_TOKEN to a token of that account")
    if "RepositoryNotFoundError" in names:
        return ("repository not found on the hub (a typo, a renamed repository, or a private "
                "one: set HF_TOKEN to a token that can read it)")
    if "RevisionNotFoundError" in names:
        return "no branch, tag or commit of that name in the repository"
    if "DisabledRepoError" in names:
        return "the repository is disabled on the hub"
    if "HfHubHTTPError" in names:
        return f"the hub answered: {_first_line(exc)}"
    if isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in HTTP_LIBS:
        return (f"cannot reach the hub ({type(exc).__name__}: {_first_line(exc)}); run this on "
                f"a machine that reaches it (HTTPS_PROXY for a proxy)")
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def resolve(hub: Hub, pin: Pin) -> str:
    """The commit the hub says pin.revision names in pin.repo."""
    try:
        info = hub.model_info(pin.repo, revision=pin.revision)
    except Exception as exc:
        msg = explain(exc)
        if msg is None:
            raise
        raise PinError(f"{pin.repo}@{pin.revision}: {msg}") from None
    sha = getattr(info, "sha", None)
    if not isinstance(sha, str) or not COMMIT.fullmatch(sha):
        raise PinError(f"{pin.repo}@{pin.revision}: the hub gave no commit hash ({sha!r})")
    return sha


def pin_file(path: Path, hub: Hub, out=None, err=None) -> bool:
    """Resolve and write back every unpinned revision of one declaration; True when all are
    pinned afterwards."""
    out, err = out or sys.stdout, err or sys.stderr
    text = path.read_text()
    pins = find_pins(text, str(path))
    todo = unpinned(pins)
    if not todo:
        print(f"{path}: all {len(pins)} revisions are commits; nothing to do", file=out)
        return True
    commits: dict[int, str] = {}
    ok = True
    for p in todo:
        try:
            commits[p.line] = resolve(hub, p)
        except PinError as e:
            print(f"error: {e}", file=err)
            ok = False
            continue
        print(f"{path}: {p.repo}: {p.revision} -> {commits[p.line]}", file=out)
    if commits:
        new = rewrite(text, commits, pins)
        # the rewritten file must still parse to the same models, now with the commits
        after = {p.line: p.revision for p in find_pins(new, str(path))}
        if any(after.get(line) != sha for line, sha in commits.items()):
            raise PinError(f"{path}: the rewritten file does not read back as written; "
                           f"left unchanged")
        path.write_text(new)
        print(f"{path}: wrote {len(commits)} commit(s)", file=out)
    return ok


def check_file(path: Path, out=None, err=None) -> bool:
    out, err = out or sys.stdout, err or sys.stderr
    pins = find_pins(path.read_text(), str(path))
    todo = unpinned(pins)
    for p in todo:
        print(f"{path}:{p.line + 1}: {p.repo}: revision {p.revision!r} is not a commit; run "
              f"`make pin-models` on a machine that reaches the hub", file=err)
    if not todo:
        print(f"{path}: all {len(pins)} revisions are commits", file=out)
    return not todo


def default_hub() -> Hub:
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise PinError("huggingface_hub is not installed here: use `make pin-models`, which "
                       "installs the version the models role pins") from None
    return HfApi()


def main(argv: list[str] | None = None, hub: Hub | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stack.pin_models",
                                 description="Resolve each declared revision that is not a "
                                             "commit and write the commit back.")
    ap.add_argument("files", nargs="*", type=Path, default=[DECLARATION],
                    help=f"model declarations (default: {DECLARATION})")
    ap.add_argument("--check", action="store_true",
                    help="only report revisions that are not commits (exit 1 if any)")
    args = ap.parse_args(argv)
    ok = True
    try:
        for path in args.files:
            if not path.is_file():
                raise PinError(f"{path}: no such file")
            if args.check:
                ok = check_file(path) and ok
            else:
                if hub is None and unpinned(find_pins(path.read_text(), str(path))):
                    hub = default_hub()
                ok = pin_file(path, hub) and ok
    except PinError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
