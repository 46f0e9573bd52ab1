#!/usr/bin/env python3
"""Fetch one model's files at a pinned revision into a folder, checked before and after.

    fetch_model.py --repo ORG/NAME --revision <40-hex commit> --dest DIR
                   [--s3-cache s3://bucket/prefix] [--allow PATTERN ...] [--min-free-gib N]
                   [--token-file FILE]

What it guarantees, in order:
1. The revision is a pinned commit (a branch or tag can move under a running fleet).
2. The disk has room BEFORE anything is downloaded: the sizes come from the hub's file metadata
   at that revision (or from the S3 cache's manifest), and a shortfall fails with the number of
   GiB missing. huggingface_hub itself only warns and then dies mid-download.
3. Resumable download: snapshot_download(local_dir=...) keeps partial files and skips finished
   ones, so a rerun after a broken connection continues where it stopped.
4. Every file is verified: its size, and its sha256 (LFS files) or git blob sha1 (small files)
   against the hub's metadata; a file that does not match is deleted (a rerun fetches it
   again) and the run fails.
5. Optional S3 cache (--s3-cache): a hit downloads from the bucket and verifies against the
   cache's manifest, without asking the hub at all (hosts with only S3 access work); a miss
   downloads from the hub, then uploads the files and, last, the manifest (so a half-finished
   upload is never taken for a hit).
6. On success: DEST/.fetch-complete-<revision> (Ansible's `creates:`), older markers removed,
   and weight/config files of an older revision that this one does not have are removed.

The HF token is read from the environment (HF_TOKEN), or from --token-file, which puts it
there: Ansible passes a root-only file because a task's `environment:` shows up in `-vvv` logs
and in the host's process list even under no_log. The token is never printed. Errors are one
line on stderr, `error: ...`, exit status 1; no tracebacks.

The hub and S3 clients are parameters of fetch() so that tests run without the hub.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Protocol

GIB = 1024**3
MARKER_PREFIX = ".fetch-complete-"
MANIFEST_NAME = "manifest.json"
PINNED = re.compile(r"[0-9a-f]{40}")
# What vLLM needs to load a model: weights, configs, tokenizer files. Not the ONNX/OpenVINO/TF
# copies many repos also carry, which would multiply the download.
DEFAULT_ALLOW = (
    "*.safetensors",
    "*.json",
    "*.model",  # sentencepiece
    "*.tiktoken",
    "*.txt",  # merges.txt, vocab.txt
    "tokenizer*",
)
# Formats nobody should load when safetensors are there; taken only when a repo has none.
FALLBACK_WEIGHTS = ("*.bin",)
SKIP_DIRS = ("onnx/", "openvino/", "coreml/", "tf/", "flax/")
CHUNK = 8 * 1024 * 1024
# Transport errors of huggingface_hub's HTTP stack (its 2.x uses httpx2) are not OSErrors.
HTTP_LIBS = ("httpx", "httpx2", "httpcore", "requests", "urllib3")


class FetchError(Exception):
    """A failure explained in one line for the operator."""


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str | None = None  # LFS files: the content's sha256
    git_sha1: str | None = None  # small files: the git blob id

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


class HubClient(Protocol):
    def list_files(self, repo: str, revision: str) -> list[RemoteFile]: ...

    def download(self, repo: str, revision: str, dest: Path, patterns: list[str]) -> None: ...


class HfHubClient:
    """The real hub, through huggingface_hub (imported here so tests never need it)."""

    def __init__(self, token: str | None) -> None:
        import huggingface_hub
        from huggingface_hub.utils import disable_progress_bars

        self._hub = huggingface_hub
        self._token = token
        if not sys.stdout.isatty():
            disable_progress_bars()  # carriage-return bars make unreadable logs

    def list_files(self, repo: str, revision: str) -> list[RemoteFile]:
        with hub_errors(repo, revision):
            info = self._hub.HfApi().model_info(
                repo, revision=revision, files_metadata=True, token=self._token
            )
        files = []
        for s in info.siblings or []:
            lfs = s.lfs
            files.append(RemoteFile(
                path=s.rfilename,
                size=int(lfs.size if lfs else (s.size or 0)),
                sha256=lfs.sha256 if lfs else None,
                git_sha1=None if lfs else s.blob_id,
            ))
        return files

    def download(self, repo: str, revision: str, dest: Path, patterns: list[str]) -> None:
        with hub_errors(repo, revision):
            self._hub.snapshot_download(
                repo, revision=revision, local_dir=dest, allow_patterns=patterns,
                token=self._token, max_workers=4,
            )


@contextlib.contextmanager
def hub_errors(repo: str, revision: str) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into one-line FetchErrors."""
    try:
        yield
    except FetchError:
        raise
    except Exception as exc:
        from huggingface_hub import errors as hf

        if isinstance(exc, hf.GatedRepoError):
            msg = "gated repository: accept its licence on the hub and set models_hf_token"
        elif isinstance(exc, hf.RepositoryNotFoundError):
            msg = "repository not found (or private: set models_hf_token)"
        elif isinstance(exc, hf.RevisionNotFoundError):
            msg = "revision not found in the repository"
        elif isinstance(exc, hf.HfHubHTTPError):
            msg = f"the hub answered {first_line(exc)}"
        elif isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in HTTP_LIBS:
            msg = (f"cannot reach the hub ({type(exc).__name__}: {first_line(exc)}); "
                   "check the proxy settings")
        else:
            raise
        raise FetchError(f"{repo}@{revision[:12]}: {msg}") from None


class S3Cache:
    """s3://bucket/prefix/<repo>/<revision>/{files..., manifest.json}"""

    def __init__(self, url: str, client: Any = None) -> None:
        m = re.fullmatch(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(.*))?", url)
        if not m:
            raise FetchError(f"--s3-cache must look like s3://bucket/prefix, not {url!r}")
        self.bucket = m.group(1)
        self.prefix = (m.group(2) or "").strip("/")
        if client is None:
            import boto3

            client = boto3.client("s3")
        self.s3 = client

    def _key(self, repo: str, revision: str, name: str) -> str:
        parts = [p for p in (self.prefix, repo, revision, name) if p]
        return "/".join(parts)

    def url(self, repo: str, revision: str) -> str:
        return f"s3://{self.bucket}/{self._key(repo, revision, '')}"

    def manifest(self, repo: str, revision: str) -> list[RemoteFile] | None:
        from botocore.exceptions import ClientError

        try:
            key = self._key(repo, revision, MANIFEST_NAME)
            obj = self.s3.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        data = json.loads(obj["Body"].read())
        return [safe(RemoteFile(path=f["path"], size=int(f["size"]), sha256=f["sha256"]))
                for f in data["files"]]

    def download(self, repo: str, revision: str, files: Sequence[RemoteFile], dest: Path,
                 log: Callable[[str], None]) -> None:
        for i, f in enumerate(files, 1):
            target = dest / f.path
            if target.is_file() and target.stat().st_size == f.size:
                log(f"  [{i}/{len(files)}] {f.path} {human(f.size)} already here")
                continue
            log(f"  [{i}/{len(files)}] {f.path} {human(f.size)} from the S3 cache")
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".s3part")
            self.s3.download_file(self.bucket, self._key(repo, revision, f.path), str(partial))
            partial.replace(target)

    def upload(self, repo: str, revision: str, files: Sequence[RemoteFile], dest: Path,
               log: Callable[[str], None]) -> None:
        for i, f in enumerate(files, 1):
            log(f"  [{i}/{len(files)}] {f.path} {human(f.size)} to the S3 cache")
            self.s3.upload_file(str(dest / f.path), self.bucket, self._key(repo, revision, f.path))
        body = json.dumps({"repo": repo, "revision": revision,
                           "files": [f.to_json() for f in files]}, indent=1).encode()
        # last: the manifest is what makes the cache entry a hit
        self.s3.put_object(Bucket=self.bucket, Key=self._key(repo, revision, MANIFEST_NAME),
                           Body=body, ContentType="application/json")


# ---------------------------------------------------------------------------------------------


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_pinned(revision: str) -> None:
    if not PINNED.fullmatch(revision):
        raise FetchError(
            f"revision {revision!r} is not pinned: give the 40-character commit hash "
            "(a branch or tag can change under a running fleet)"
        )


def select(
    files: Iterable[RemoteFile], patterns: Sequence[str]
) -> tuple[list[RemoteFile], list[str]]:
    """The files to fetch, with the patterns that pick them (as huggingface_hub matches them)."""
    files = [safe(f) for f in files if not f.path.startswith(SKIP_DIRS)]
    patterns = list(patterns)
    if not any(fnmatchcase(f.path, "*.safetensors") for f in files):
        patterns += [p for p in FALLBACK_WEIGHTS if p not in patterns]
    chosen = [f for f in files if any(fnmatchcase(f.path, p) for p in patterns)]
    if not chosen:
        raise FetchError(f"no file of the repository matches {', '.join(patterns)}")
    return sorted(chosen, key=lambda f: f.path), patterns


def safe(f: RemoteFile) -> RemoteFile:
    """A file name from the hub or a manifest stays inside the destination folder."""
    parts = f.path.split("/")
    if f.path.startswith("/") or ".." in parts or "" in parts:
        raise FetchError(f"refusing file name {f.path!r}: it would leave the model folder")
    return f


def existing_parent(path: Path) -> Path:
    for p in (path, *path.parents):
        if p.exists():
            return p
    return Path("/")


def check_free_space(dest: Path, files: Sequence[RemoteFile], min_free_gib: float, what: str,
                     disk_usage: Callable[[Path], Any] = shutil.disk_usage) -> None:
    """Fail before downloading when the files (less what is already here) do not fit."""
    present = 0
    for f in files:
        p = dest / f.path
        if p.is_file():
            present += min(p.stat().st_size, f.size)
    need = sum(f.size for f in files) - present
    reserve = min_free_gib * GIB
    free = disk_usage(existing_parent(dest)).free
    missing = need + reserve - free
    if missing > 0:
        raise FetchError(
            f"not enough disk space for {what} in {existing_parent(dest)}: "
            f"{missing / GIB:.1f} GiB missing (the download needs {need / GIB:.1f} GiB, "
            f"{reserve / GIB:.1f} GiB stays free, {free / GIB:.1f} GiB is free)"
        )


def digests(path: Path, size: int) -> tuple[str, str]:
    """sha256 of the content and its git blob sha1, in one read."""
    sha256 = hashlib.sha256()
    git = hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False)
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            sha256.update(chunk)
            git.update(chunk)
    return sha256.hexdigest(), git.hexdigest()


def verify(dest: Path, files: Sequence[RemoteFile], log: Callable[[str], None]) -> list[RemoteFile]:
    """Check every file; return them with their sha256 filled in. A bad file is deleted."""
    checked = []
    for i, f in enumerate(files, 1):
        p = dest / f.path
        if not p.is_file():
            raise FetchError(f"{f.path} is missing after the download; run again to resume")
        size = p.stat().st_size
        if size != f.size:
            p.unlink()
            raise FetchError(
                f"{f.path} has {size} bytes, expected {f.size}: removed it, run again to re-fetch"
            )
        sha256, git_sha1 = digests(p, size)
        if f.sha256 and sha256 != f.sha256:
            p.unlink()
            raise FetchError(
                f"checksum mismatch for {f.path}: sha256 {sha256[:16]}..., expected "
                f"{f.sha256[:16]}...: removed it, run again to re-fetch"
            )
        if f.git_sha1 and git_sha1 != f.git_sha1:
            p.unlink()
            raise FetchError(
                f"checksum mismatch for {f.path}: git sha1 {git_sha1[:12]}..., expected "
                f"{f.git_sha1[:12]}...: removed it, run again to re-fetch"
            )
        log(f"  [{i}/{len(files)}] {f.path} {human(size)} verified")
        checked.append(RemoteFile(path=f.path, size=size, sha256=sha256, git_sha1=git_sha1))
    return checked


def prune(dest: Path, keep: Iterable[RemoteFile], patterns: Sequence[str],
          log: Callable[[str], None]) -> None:
    """Remove weight/config files an older revision left behind (vLLM globs *.safetensors)."""
    wanted = {f.path for f in keep}
    for p in sorted(dest.rglob("*")):
        rel = p.relative_to(dest).as_posix()
        if rel.startswith(".") or not p.is_file() or rel in wanted:
            continue
        if any(fnmatchcase(rel, pat) for pat in patterns):
            log(f"  removing {rel} (not part of this revision)")
            p.unlink()


def write_marker(dest: Path, repo: str, revision: str, files: Sequence[RemoteFile],
                 source: str) -> Path:
    for old in dest.glob(MARKER_PREFIX + "*"):
        old.unlink()
    marker = dest / f"{MARKER_PREFIX}{revision}"
    body = {"repo": repo, "revision": revision, "source": source,
            "files": [f.to_json() for f in files]}
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(body, indent=1) + "\n")
    tmp.replace(marker)
    return marker


def fetch(repo: str, revision: str, dest: Path, *, hub: Callable[[], HubClient],
          cache: S3Cache | None = None, allow: Sequence[str] = DEFAULT_ALLOW,
          min_free_gib: float = 1.0, log: Callable[[str], None] = print,
          disk_usage: Callable[[Path], Any] = shutil.disk_usage) -> Path:
    """Fetch and verify; return the completion marker. `hub` makes the hub client; it is
    called only on a cache miss (a cache hit needs neither the hub nor its token)."""
    check_pinned(revision)
    what = f"{repo}@{revision[:12]}"
    dest.mkdir(parents=True, exist_ok=True)

    if cache is not None:
        try:
            files = cache.manifest(repo, revision)
        except FetchError:
            raise
        except Exception as exc:  # the cache only saves time: fall back to the hub
            log(f"warning: S3 cache unreadable ({type(exc).__name__}: {first_line(exc)}); "
                "fetching from the hub")
            cache, files = None, None
        if cache is not None and files is not None:
            log(f"{what}: S3 cache hit at {cache.url(repo, revision)} ({len(files)} files)")
            check_free_space(dest, files, min_free_gib, what, disk_usage)
            cache.download(repo, revision, files, dest, log)
            try:
                checked = verify(dest, files, log)
            except FetchError as exc:
                raise FetchError(f"S3 cache copy of {what} is damaged: {exc}") from None
            _, patterns = select(files, allow)
            prune(dest, checked, patterns, log)
            return write_marker(dest, repo, revision, checked, "s3")
        if cache is not None:
            log(f"{what}: not in the S3 cache yet, fetching from the hub")

    client = hub()
    files, patterns = select(client.list_files(repo, revision), allow)
    total = sum(f.size for f in files)
    log(f"{what}: {len(files)} files, {human(total)}")
    check_free_space(dest, files, min_free_gib, what, disk_usage)
    for i, f in enumerate(files, 1):
        log(f"  [{i}/{len(files)}] {f.path} {human(f.size)}")
    client.download(repo, revision, dest, patterns)
    checked = verify(dest, files, log)
    prune(dest, checked, patterns, log)
    if cache is not None:
        try:
            cache.upload(repo, revision, checked, dest, log)
        except Exception as exc:  # this host has verified weights; the next host asks the hub
            log(f"warning: could not fill the S3 cache ({type(exc).__name__}: "
                f"{first_line(exc)})")
    return write_marker(dest, repo, revision, checked, "hub")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", required=True, help="hub repository, ORG/NAME")
    p.add_argument("--revision", required=True, help="pinned 40-character commit hash")
    p.add_argument("--dest", required=True, type=Path, help="folder the files go to")
    p.add_argument("--s3-cache", default="", help="s3://bucket/prefix shared by hosts")
    p.add_argument("--allow", action="append", default=None,
                   help="file pattern to fetch (repeatable); default: weights, configs, tokenizer")
    p.add_argument("--min-free-gib", type=float, default=1.0,
                   help="space that must stay free after the download (GiB)")
    p.add_argument("--token-file", type=Path, default=None,
                   help="file holding the HF token (sets HF_TOKEN for this process)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None, hub: HubClient | None = None,
         s3_client: Any = None) -> int:
    args = parse_args(argv)
    os.umask(0o022)  # files readable by the service user, writable by root only
    try:
        if args.token_file is not None:
            try:
                token = args.token_file.read_text().strip()
            except OSError as exc:
                raise FetchError(f"cannot read the token file: {first_line(exc)}") from None
            if token:
                os.environ["HF_TOKEN"] = token
        cache = S3Cache(args.s3_cache, s3_client) if args.s3_cache else None
        def make_hub() -> HubClient:
            return hub or HfHubClient(os.environ.get("HF_TOKEN") or None)

        marker = fetch(args.repo, args.revision, args.dest, hub=make_hub, cache=cache,
                       allow=args.allow or DEFAULT_ALLOW, min_free_gib=args.min_free_gib,
                       log=lambda line: print(line, flush=True))
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; run again to resume", file=sys.stderr)
        return 1
    except Exception as exc:  # boto3/botocore and anything else: one line, no traceback
        print(f"error: {args.repo}: {type(exc).__name__}: {first_line(exc)}", file=sys.stderr)
        return 1
    print(f"ok: {args.repo}@{args.revision[:12]} complete in {args.dest} ({marker.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
