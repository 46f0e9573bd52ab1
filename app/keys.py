"""API keys: a JSON file of hashed keys, the lookup the gateway does, and its CLI.

A key reads `sk-<id>-<secret>`. The id (12 hex characters) finds the record; the secret is
checked against its SHA-256 with a constant-time comparison. Keys are 256-bit random, so a
fast hash is enough: nothing to brute-force. Only hashes are stored; a new key is printed
once. Writes are atomic (temp file + rename) and the file is kept at mode 0600.

    python -m app.keys create NAME --models a,b --rpm 60 --tpm 100000 --concurrency 4
    python -m app.keys list | revoke NAME | rotate NAME [--grace-minutes 10]

With several hosts the same records live in one S3 object instead (`--store s3://bucket/key`,
or `keys_s3` in the gateway's config): app/keys_s3.py reads and writes it.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol, TypeVar

from app.config import ConfigError, config_path_from_env, load_config, parse_s3_url

log = logging.getLogger("gateway.keys")

KEY_PREFIX = "sk-"
ID_LEN = 12
ALL_MODELS = "*"


class KeyStoreError(Exception):
    """The keys file cannot be read or the command cannot be carried out."""


@dataclass(slots=True)
class KeyRecord:
    id: str
    name: str
    hash: str
    models: list[str]
    rpm: int
    tpm: int
    max_concurrency: int
    created_at: str
    expires_at: str | None = None
    revoked_at: str | None = None
    # parsed once for the hot path, not stored
    _expires_ts: float | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._expires_ts = _parse_ts(self.expires_at) if self.expires_at else None

    def allows(self, model: str) -> bool:
        return ALL_MODELS in self.models or model in self.models

    def expired(self, now: float) -> bool:
        return self._expires_ts is not None and now >= self._expires_ts

    def active(self, now: float) -> bool:
        return self.revoked_at is None and not self.expired(now)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("_expires_ts")
        return d


def now_iso() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def _parse_ts(value: str) -> float:
    dt = datetime.fromisoformat(value)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def split_key(key: str) -> tuple[str, str] | None:
    """('id', 'secret') of a well-formed key, else None."""
    if not key.startswith(KEY_PREFIX) or len(key) < len(KEY_PREFIX) + ID_LEN + 2:
        return None
    key_id = key[len(KEY_PREFIX) : len(KEY_PREFIX) + ID_LEN]
    if key[len(KEY_PREFIX) + ID_LEN] != "-":
        return None
    return key_id, key[len(KEY_PREFIX) + ID_LEN + 1 :]


def new_key() -> tuple[str, str, str]:
    """(key, id, hash) of a fresh key."""
    key_id = secrets.token_hex(ID_LEN // 2)
    secret = secrets.token_urlsafe(32)
    return f"{KEY_PREFIX}{key_id}-{secret}", key_id, _hash(secret)


def issue_key(records: list[KeyRecord], name: str, models: list[str], rpm: int, tpm: int,
              concurrency: int, expires_at: str | None = None) -> str:
    """Append a new key for `name` to `records`; return the key itself (shown once)."""
    key, key_id, digest = new_key()
    records.append(KeyRecord(id=key_id, name=name, hash=digest, models=list(models), rpm=rpm,
                             tpm=tpm, max_concurrency=concurrency, created_at=now_iso(),
                             expires_at=expires_at))
    return key


_HEX = frozenset("0123456789abcdef")
_FIELDS = {f for f in KeyRecord.__dataclass_fields__ if not f.startswith("_")}
_REQUIRED = {"id", "name", "hash", "models", "rpm", "tpm", "max_concurrency", "created_at"}


def _check_record(i: int, r: object) -> KeyRecord:
    """One record, every field type- and range-checked. Messages name the record and the field
    but never echo a value: a hash has no business in a log line."""
    if not isinstance(r, dict):
        raise ValueError(f"keys[{i}] is not an object")
    where = f"keys[{i}]" + (f" ({r['name']!r})" if isinstance(r.get("name"), str) else "")
    if unknown := sorted(set(r) - _FIELDS):
        raise ValueError(f"{where}: unknown field {unknown[0]!r}")
    if missing := sorted(_REQUIRED - set(r)):
        raise ValueError(f"{where}: field {missing[0]!r} is missing")

    def bad(field: str, want: str) -> ValueError:
        return ValueError(f"{where}.{field}: must be {want} (got {type(r[field]).__name__})")

    if not (isinstance(r["id"], str) and len(r["id"]) == ID_LEN and set(r["id"]) <= _HEX):
        raise bad("id", f"{ID_LEN} lowercase hex characters")
    if not (isinstance(r["hash"], str) and len(r["hash"]) == 64 and set(r["hash"]) <= _HEX):
        raise bad("hash", "a SHA-256 hex digest")
    if not (isinstance(r["name"], str) and r["name"]):
        raise bad("name", "a non-empty string")
    # a string here would grant by substring ('text2sql' in 'sql'), hence the strict list
    models = r["models"]
    if not (isinstance(models, list) and models
            and all(isinstance(m, str) and m for m in models)):
        raise bad("models", "a non-empty list of model names")
    for f in ("rpm", "tpm", "max_concurrency"):
        if not (type(r[f]) is int and r[f] >= 1):  # bool is an int subclass: refuse it too
            raise bad(f, "an integer of at least 1")
    for f in ("created_at", "expires_at", "revoked_at"):
        value = r.get(f)
        if value is None and f != "created_at":
            continue
        try:
            _parse_ts(value)
        except (TypeError, ValueError):
            raise bad(f, "an ISO date-time") from None
    return KeyRecord(**r)


def parse_records(text: str) -> list[KeyRecord]:
    """The records of a keys file's text; ValueError names the first fault."""
    if not text.strip():
        return []  # created empty by the installer: no keys yet
    data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError("expected an object with a 'keys' list")
    if data.get("version", 1) != 1:
        raise ValueError("unsupported 'version' (this gateway reads version 1)")
    records = [_check_record(i, r) for i, r in enumerate(data["keys"])]
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError("two records share one id")
    return records


def read_records(path: Path, missing_ok: bool = True) -> list[KeyRecord]:
    """The file's records. A missing file is an empty set for the CLI (its first `create`
    makes it), but an error for the gateway (a wrong path would lock every client out)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        if missing_ok:
            return []
        raise KeyStoreError(f"keys file {path} does not exist (an empty file means no keys)")\
            from None
    except OSError as e:
        raise KeyStoreError(f"keys file {path} cannot be read: {e.strerror or e}") from None
    try:
        return parse_records(text)
    except json.JSONDecodeError as e:
        raise KeyStoreError(f"keys file {path} cannot be read: not JSON ({e})") from None
    except ValueError as e:
        raise KeyStoreError(f"keys file {path} is malformed: {e}; restore a backup") from None


def records_json(records: list[KeyRecord]) -> str:
    """The text of a keys file (or of the shared keys object) holding `records`."""
    return json.dumps({"version": 1, "keys": [r.to_json() for r in records]}, indent=2) + "\n"


def write_records(path: Path, records: list[KeyRecord]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = records_json(records)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        try:  # keep the owner (the gateway's service user) when root runs the CLI
            st = path.stat()
            os.fchown(fd, st.st_uid, st.st_gid)
        except (FileNotFoundError, PermissionError):
            pass
        with os.fdopen(fd, "w") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class KeyStore:
    """What the gateway consults per request; re-reads the file when it changes.

    A file that cannot be used at start raises KeyStoreError (the process must not serve with
    a wrong key set). One that goes bad later is refused: the last good set stays in force, so
    a revocation already applied stays applied, and `on_reload(ok)` tells the metrics.
    """

    def __init__(self, path: Path, recheck_s: float = 1.0, must_exist: bool = False,
                 on_reload: Callable[[bool], None] | None = None):
        self.path = path
        self.recheck_s = recheck_s
        self.must_exist = must_exist
        self.on_reload = on_reload
        self._by_id: dict[str, KeyRecord] = {}
        self._version: tuple | None = ()  # () = never read; None = the file was missing
        self._checked = 0.0
        self.reload()

    def __len__(self) -> int:
        return len(self._by_id)

    def _stat(self) -> tuple | None:
        try:
            st = self.path.stat()
        except OSError:  # missing or unreachable: reading it says which, and is refused
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def reload(self) -> None:
        """Read the file if it changed since the last attempt; KeyStoreError if it is bad
        (the current set is then kept)."""
        version = self._stat()
        if version == self._version:
            return
        # remembered before reading: one bad version fails (and is reported) once, not on
        # every recheck
        self._version = version
        self._by_id = {r.id: r for r in read_records(self.path, not self.must_exist)}

    def _maybe_reload(self, now: float) -> None:
        if now - self._checked < self.recheck_s:
            return
        self._checked = now
        before = self._version
        try:
            self.reload()
        except KeyStoreError as e:
            log.error("keys file not reloaded, keeping the last good set of %d keys: %s",
                      len(self._by_id), e)
            if self.on_reload:
                self.on_reload(False)
            return
        if self._version != before:
            log.info("keys file reloaded: %d keys", len(self._by_id))
            if self.on_reload:
                self.on_reload(True)

    def check(self) -> None:
        """Reload now if due; the gateway calls this on a timer so a bad file is reported
        even when no request arrives."""
        self._maybe_reload(time.time())

    def authenticate(self, key: str) -> KeyRecord | None:
        """The active record this key opens, or None."""
        now = time.time()
        self._maybe_reload(now)
        parts = split_key(key)
        if parts is None:
            return None
        rec = self._by_id.get(parts[0])
        if rec is None:
            return None
        if not hmac.compare_digest(_hash(parts[1]), rec.hash):
            return None
        return rec if rec.active(now) else None


# ---------------------------------------------------------------- CLI


T = TypeVar("T")


class KeySet(Protocol):
    """What the CLI reads and changes: a keys file (FileKeys) or the shared S3 object
    (app.keys_s3.S3Keys). `update` applies `change` to the records and saves them."""

    def read(self) -> list[KeyRecord]: ...

    def update(self, change: Callable[[list[KeyRecord]], T]) -> T: ...


def _find_active(records: list[KeyRecord], name: str) -> KeyRecord:
    now = time.time()
    for r in records:
        if r.name == name and r.active(now):
            return r
    raise KeyStoreError(f"no active key named {name!r} (see: python -m app.keys list)")


def _expiry(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        ts = _parse_ts(value)
    except ValueError:
        raise KeyStoreError(
            f"--expires {value!r} is not an ISO date or time (e.g. 2027-01-31 or 2027-01-31T12:00Z)"
        ) from None
    if ts <= time.time():
        raise KeyStoreError(f"--expires {value!r} is in the past")
    return datetime.fromtimestamp(ts, UTC).isoformat()


class FileKeys:
    """The key set the CLI changes when it is a file on this host."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> list[KeyRecord]:
        return read_records(self.path)

    def update(self, change: Callable[[list[KeyRecord]], T]) -> T:
        records = read_records(self.path)
        result = change(records)
        write_records(self.path, records)
        return result


def cmd_create(args: argparse.Namespace, store: KeySet) -> int:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        raise KeyStoreError("--models needs at least one model name, or '*' for all")
    expires = _expiry(args.expires)

    def change(records: list[KeyRecord]) -> str:
        if any(r.name == args.name and r.active(time.time()) for r in records):
            raise KeyStoreError(f"an active key named {args.name!r} exists; rotate or revoke it")
        return issue_key(records, args.name, models, args.rpm, args.tpm, args.concurrency,
                         expires)

    _print_new(args, store.update(change))
    return 0


def cmd_rotate(args: argparse.Namespace, store: KeySet) -> int:
    def change(records: list[KeyRecord]) -> str:
        old = _find_active(records, args.name)
        key = issue_key(records, old.name, old.models, old.rpm, old.tpm, old.max_concurrency,
                        old.expires_at)
        if args.grace_minutes > 0:
            until = datetime.now(UTC) + timedelta(minutes=args.grace_minutes)
            if old.expires_at is None or _parse_ts(old.expires_at) > until.timestamp():
                old.expires_at = until.replace(microsecond=0).isoformat()
        else:
            old.revoked_at = now_iso()
        return key

    _print_new(args, store.update(change))
    return 0


def cmd_revoke(args: argparse.Namespace, store: KeySet) -> int:
    def change(records: list[KeyRecord]) -> KeyRecord:
        rec = _find_active(records, args.name)
        rec.revoked_at = now_iso()
        return rec

    rec = store.update(change)
    print(f"revoked key {rec.name} (id {rec.id})", file=sys.stderr)
    return 0


def cmd_list(args: argparse.Namespace, store: KeySet) -> int:
    now = time.time()
    rows = []
    for r in store.read():
        state = "revoked" if r.revoked_at else "expired" if r.expired(now) else "active"
        if state != "active" and not args.all:
            continue
        rows.append((r.name, r.id, state, ",".join(r.models), str(r.rpm), str(r.tpm),
                     str(r.max_concurrency), r.expires_at or "-"))
    if args.json:
        cols = ("name", "id", "state", "models", "rpm", "tpm", "concurrency", "expires")
        print(json.dumps([dict(zip(cols, row, strict=True)) for row in rows], indent=2))
        return 0
    header = ("NAME", "ID", "STATE", "MODELS", "RPM", "TPM", "CONC", "EXPIRES")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    for row in (header, *rows):
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_import(args: argparse.Namespace, store: KeySet) -> int:
    """Add the records of a keys file that the key set lacks (by id): a host's own keys moved
    into the deployment's store, with nothing there overwritten."""
    records = read_records(args.keys_file, missing_ok=False)

    def change(current: list[KeyRecord]) -> list[KeyRecord]:
        known = {r.id for r in current}
        new = [r for r in records if r.id not in known]
        current.extend(new)
        return new

    new = store.update(change)
    print(f"imported {len(new)} of {len(records)} keys from {args.keys_file}"
          + (f": {', '.join(r.name for r in new)}" if new else " (the others were there)"),
          file=sys.stderr)
    return 0


def cmd_missing(args: argparse.Namespace, store: KeySet) -> int:
    """The working keys of a keys file that the key set lacks, one per line; exit 3 when there
    is one. A host about to read the store instead of its file would refuse them."""
    known = {r.id for r in store.read()}
    now = time.time()
    missing = [r for r in read_records(args.keys_file) if r.id not in known
               and not r.revoked_at and not r.expired(now)]
    for r in missing:
        print(f"{r.name} (id {r.id})")
    return 3 if missing else 0


def _print_new(args: argparse.Namespace, key: str) -> None:
    # The key goes to stdout alone so scripts can capture it; the advice to stderr.
    print(key)
    print(f"key {args.name!r}: store it now, it is not shown again", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m app.keys", description="Manage gateway API keys.")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--file", type=Path, default=None,
        help="keys file (default: $GATEWAY_KEYS_FILE, else keys_file or keys_s3 of "
        "$GATEWAY_CONFIG)",
    )
    where.add_argument(
        "--store", default=None, metavar="s3://BUCKET/KEY",
        help="the deployment's shared keys object in S3 (written with your AWS credentials)",
    )
    p.add_argument("--region", default=None,
                   help="region of the --store bucket (default: the AWS SDK's, "
                        "e.g. AWS_DEFAULT_REGION)")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("create", help="create a key and print it once")
    c.add_argument("name")
    c.add_argument("--models", default=ALL_MODELS, help="comma-separated model names, or '*'")
    c.add_argument("--rpm", type=int, default=60, help="requests per minute")
    c.add_argument("--tpm", type=int, default=100_000, help="tokens (prompt+completion) per minute")
    c.add_argument("--concurrency", type=int, default=8, help="max concurrent requests")
    c.add_argument("--expires", default=None, help="ISO date or time after which it stops working")
    r = sub.add_parser("rotate", help="replace a key with a new one and print it once")
    r.add_argument("name")
    r.add_argument("--grace-minutes", type=int, default=0,
                   help="keep the old key working this long (default: revoke at once)")
    v = sub.add_parser("revoke", help="stop a key from working")
    v.add_argument("name")
    ls = sub.add_parser("list", help="show keys (never their secrets)")
    ls.add_argument("--all", action="store_true", help="include revoked and expired keys")
    ls.add_argument("--json", action="store_true")
    i = sub.add_parser("import", help="add the keys of a keys file that are not there yet")
    i.add_argument("keys_file", type=Path, metavar="FILE")
    m = sub.add_parser("missing", help="the working keys of a keys file that are not there "
                       "(exit 3 when there is one)")
    m.add_argument("keys_file", type=Path, metavar="FILE")
    return p


def _key_set(args: argparse.Namespace) -> KeySet:
    """Where the keys are: --file, --store, $GATEWAY_KEYS_FILE, else the gateway's config."""
    store, region = args.store, args.region
    if args.file is None and store is None:
        if os.environ.get("GATEWAY_KEYS_FILE"):
            return FileKeys(Path(os.environ["GATEWAY_KEYS_FILE"]))
        cfg = load_config(config_path_from_env())
        if cfg.keys_file is not None:
            return FileKeys(cfg.keys_file)
        store, region = cfg.keys_s3.url, region or cfg.keys_s3.region
    if store is None:
        return FileKeys(args.file)
    try:
        parse_s3_url(store)
    except ValueError as e:
        raise KeyStoreError(f"--store: {e}") from None
    from app.keys_s3 import S3Keys  # the AWS SDK only when the keys are there

    return S3Keys(store, region, notice=lambda msg: print(msg, file=sys.stderr))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for flag in ("rpm", "tpm", "concurrency"):
        if getattr(args, flag, 1) < 1:
            print(f"error: --{flag} must be at least 1", file=sys.stderr)
            return 2
    handler = {"create": cmd_create, "rotate": cmd_rotate, "revoke": cmd_revoke,
               "list": cmd_list, "import": cmd_import, "missing": cmd_missing}[args.command]
    try:
        return handler(args, _key_set(args))
    except (KeyStoreError, ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
