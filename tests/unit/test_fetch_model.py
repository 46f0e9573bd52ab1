"""ansible/roles/models/files/fetch_model.py: the weights fetcher GPU hosts run per model.

The hub is a fake client object (no network here); S3 is moto's in-process fake driven by real
boto3 calls.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from collections import namedtuple
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "ansible" / "roles" / "models" / "files" / "fetch_model.py"

_spec = importlib.util.spec_from_file_location("fetch_model", SCRIPT)
fm = importlib.util.module_from_spec(_spec)
sys.modules["fetch_model"] = fm  # dataclasses look their module up while the class is built
_spec.loader.exec_module(fm)

REPO = "acme/tiny-sql"
REV = "0123456789abcdef0123456789abcdef01234567"
GIB = 1024**3
Usage = namedtuple("Usage", "total used free")
PLENTY = lambda _path: Usage(100 * GIB, 0, 100 * GIB)  # noqa: E731


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """Stands in for HfHubClient: the repository is a dict of path -> bytes."""

    def __init__(self, files: dict[str, bytes], lfs: tuple[str, ...] = ("model.safetensors",),
                 corrupt: tuple[str, ...] = (), sizes: dict[str, int] | None = None):
        self.files = files
        self.lfs = lfs
        self.corrupt = corrupt
        self.sizes = sizes or {}
        self.downloads: list[list[str]] = []

    def list_files(self, repo, revision):
        out = []
        for path, data in self.files.items():
            size = self.sizes.get(path, len(data))
            if path in self.lfs:
                out.append(fm.RemoteFile(path, size, sha256=hashlib.sha256(data).hexdigest()))
            else:
                out.append(fm.RemoteFile(path, size, git_sha1=git_sha1(data)))
        return out

    def download(self, repo, revision, dest, patterns):
        from fnmatch import fnmatchcase

        got = []
        for path, data in self.files.items():
            if any(fnmatchcase(path, p) for p in patterns):
                target = Path(dest) / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(b"X" * len(data) if path in self.corrupt else data)
                got.append(path)
        self.downloads.append(got)


def no_hub():
    raise AssertionError("the hub must not be asked")


MODEL = {
    "config.json": b'{"model_type": "qwen2"}',
    "tokenizer.json": b'{"version": "1.0"}',
    "model.safetensors": b"\x00weights\x01" * 1000,
    "onnx/model.onnx": b"not wanted",
    "README.md": b"# not wanted either",
}


@pytest.fixture
def s3(monkeypatch):
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="model-cache")
        yield client


def keys(client) -> set[str]:
    return {o["Key"] for o in client.list_objects_v2(Bucket="model-cache").get("Contents", [])}


def test_cache_miss_downloads_from_the_hub_verifies_then_uploads_files_and_manifest(tmp_path, s3):
    hub = FakeHub(MODEL)
    cache = fm.S3Cache("s3://model-cache/weights", s3)
    dest = tmp_path / "text2sql"

    marker = fm.fetch(REPO, REV, dest, hub=lambda: hub, cache=cache, log=lambda _: None,
                      disk_usage=PLENTY)

    assert marker == dest / f".fetch-complete-{REV}"
    assert hub.downloads == [["config.json", "tokenizer.json", "model.safetensors"]]
    assert (dest / "model.safetensors").read_bytes() == MODEL["model.safetensors"]
    assert not (dest / "README.md").exists() and not (dest / "onnx").exists()
    prefix = f"weights/{REPO}/{REV}/"
    assert keys(s3) == {prefix + n for n in
                        ("config.json", "tokenizer.json", "model.safetensors", "manifest.json")}
    manifest = json.loads(s3.get_object(Bucket="model-cache", Key=prefix + "manifest.json")
                          ["Body"].read())
    by_path = {f["path"]: f for f in manifest["files"]}
    assert by_path["model.safetensors"]["sha256"] == hashlib.sha256(
        MODEL["model.safetensors"]).hexdigest()
    assert json.loads(marker.read_text())["source"] == "hub"


def test_cache_hit_downloads_from_s3_and_never_asks_the_hub(tmp_path, s3):
    cache = fm.S3Cache("s3://model-cache/weights", s3)
    fm.fetch(REPO, REV, tmp_path / "first-host", hub=lambda: FakeHub(MODEL), cache=cache,
             log=lambda _: None, disk_usage=PLENTY)

    lines: list[str] = []
    dest = tmp_path / "second-host"
    marker = fm.fetch(REPO, REV, dest, hub=no_hub, cache=cache, log=lines.append,
                      disk_usage=PLENTY)

    assert json.loads(marker.read_text())["source"] == "s3"
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        assert (dest / name).read_bytes() == MODEL[name]
    assert any("S3 cache hit" in line for line in lines)
    assert sum("verified" in line for line in lines) == 3  # progress: one line per file


def test_damaged_object_in_the_cache_is_refused(tmp_path, s3):
    cache = fm.S3Cache("s3://model-cache/weights", s3)
    fm.fetch(REPO, REV, tmp_path / "a", hub=lambda: FakeHub(MODEL), cache=cache,
             log=lambda _: None, disk_usage=PLENTY)
    key = f"weights/{REPO}/{REV}/model.safetensors"
    s3.put_object(Bucket="model-cache", Key=key, Body=b"Y" * len(MODEL["model.safetensors"]))

    with pytest.raises(fm.FetchError, match="S3 cache copy .* is damaged: checksum mismatch"):
        fm.fetch(REPO, REV, tmp_path / "b", hub=no_hub, cache=cache, log=lambda _: None,
                 disk_usage=PLENTY)
    assert not (tmp_path / "b" / "model.safetensors").exists()


def test_checksum_mismatch_is_refused_the_file_removed_and_nothing_uploaded(tmp_path, s3,
                                                                           capsys):
    hub = FakeHub(MODEL, corrupt=("model.safetensors",))
    dest = tmp_path / "m"

    rc = fm.main(["--repo", REPO, "--revision", REV, "--dest", str(dest),
                  "--s3-cache", "s3://model-cache/weights"], hub=hub, s3_client=s3)

    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("error: checksum mismatch for model.safetensors: sha256 ")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (dest / "model.safetensors").exists()  # a rerun fetches it again
    assert not list(dest.glob(".fetch-complete-*"))
    assert keys(s3) == set()


def test_small_files_are_checked_against_their_git_blob_id(tmp_path):
    hub = FakeHub(MODEL, corrupt=("config.json",))
    with pytest.raises(fm.FetchError, match="checksum mismatch for config.json: git sha1"):
        fm.fetch(REPO, REV, tmp_path / "m", hub=lambda: hub, log=lambda _: None,
                 disk_usage=PLENTY)


def test_free_space_is_checked_before_downloading_and_says_how_many_gib_are_missing(tmp_path):
    hub = FakeHub(MODEL, sizes={"model.safetensors": 5 * GIB})
    two_gib_free = lambda _path: Usage(10 * GIB, 8 * GIB, 2 * GIB)  # noqa: E731

    with pytest.raises(fm.FetchError) as err:
        fm.fetch(REPO, REV, tmp_path / "m", hub=lambda: hub, min_free_gib=1.0,
                 log=lambda _: None, disk_usage=two_gib_free)

    msg = str(err.value)
    assert msg.startswith(f"not enough disk space for {REPO}@{REV[:12]} in {tmp_path / 'm'}: "
                          "4.0 GiB missing")
    assert "needs 5.0 GiB" in msg and "2.0 GiB is free" in msg
    assert hub.downloads == []  # refused before anything was fetched


def test_unpinned_revision_is_refused_before_any_download(tmp_path, capsys):
    hub = FakeHub(MODEL)
    rc = fm.main(["--repo", REPO, "--revision", "main", "--dest", str(tmp_path / "m")], hub=hub)

    err = capsys.readouterr().err
    assert rc == 1
    assert err == ("error: revision 'main' is not pinned: give the 40-character commit hash "
                   "(a branch or tag can change under a running fleet)\n")
    assert hub.downloads == []


def test_a_new_revision_removes_weights_the_old_one_had_and_moves_the_marker(tmp_path):
    dest = tmp_path / "m"
    old = {**MODEL, "model-00001-of-00002.safetensors": b"old shard"}
    fm.fetch(REPO, "a" * 40, dest, hub=lambda: FakeHub(old), log=lambda _: None,
             disk_usage=PLENTY)
    (dest / "notes.md").write_text("operator's file, not ours")

    fm.fetch(REPO, REV, dest, hub=lambda: FakeHub(MODEL), log=lambda _: None, disk_usage=PLENTY)

    assert not (dest / "model-00001-of-00002.safetensors").exists()
    assert (dest / "notes.md").exists()
    assert [p.name for p in dest.glob(".fetch-complete-*")] == [f".fetch-complete-{REV}"]


def test_repositories_without_safetensors_fall_back_to_bin_weights(tmp_path):
    hub = FakeHub({"config.json": b"{}", "pytorch_model.bin": b"pickle"},
                  lfs=("pytorch_model.bin",))
    fm.fetch(REPO, REV, tmp_path / "m", hub=lambda: hub, log=lambda _: None, disk_usage=PLENTY)
    assert hub.downloads == [["config.json", "pytorch_model.bin"]]


def test_file_names_that_leave_the_model_folder_are_refused(tmp_path):
    hub = FakeHub({"../../etc/cron.d/x.json": b"{}", "model.safetensors": b"w"})
    with pytest.raises(fm.FetchError, match="would leave the model folder"):
        fm.fetch(REPO, REV, tmp_path / "m", hub=lambda: hub, log=lambda _: None,
                 disk_usage=PLENTY)


def test_unexpected_errors_are_one_line_without_traceback(tmp_path, capsys):
    class Broken(FakeHub):
        def list_files(self, repo, revision):
            raise RuntimeError("boom\nsecond line")

    rc = fm.main(["--repo", REPO, "--revision", REV, "--dest", str(tmp_path / "m")],
                 hub=Broken(MODEL))
    assert rc == 1
    assert capsys.readouterr().err == f"error: {REPO}: RuntimeError: boom\n"


def test_token_file_sets_hf_token_for_the_fetcher_only(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    token_file = tmp_path / "hf-token"
    token_file.write_text("hf_example_token\n")
    seen = {}

    class TokenAware(FakeHub):
        def list_files(self, repo, revision):
            import os

            seen["token"] = os.environ.get("HF_TOKEN")
            return super().list_files(repo, revision)

    rc = fm.main(["--repo", REPO, "--revision", REV, "--dest", str(tmp_path / "m"),
                  "--token-file", str(token_file), "--min-free-gib", "0"], hub=TokenAware(MODEL))
    assert rc == 0 and seen["token"] == "hf_example_token"


def test_an_unreadable_cache_falls_back_to_the_hub_with_a_warning(tmp_path, s3):
    lines: list[str] = []
    cache = fm.S3Cache("s3://no-such-bucket/weights", s3)

    marker = fm.fetch(REPO, REV, tmp_path / "m", hub=lambda: FakeHub(MODEL), cache=cache,
                      log=lines.append, disk_usage=PLENTY)

    assert json.loads(marker.read_text())["source"] == "hub"
    assert any(line.startswith("warning: S3 cache unreadable (NoSuchBucket: ") for line in lines)


def test_a_cache_that_cannot_be_filled_only_warns(tmp_path, s3):
    class ReadOnly:
        def __getattr__(self, name):
            return getattr(s3, name)

        def upload_file(self, *args, **kwargs):
            raise PermissionError("AccessDenied")

    lines: list[str] = []
    cache = fm.S3Cache("s3://model-cache/weights", ReadOnly())

    marker = fm.fetch(REPO, REV, tmp_path / "m", hub=lambda: FakeHub(MODEL), cache=cache,
                      log=lines.append, disk_usage=PLENTY)

    assert json.loads(marker.read_text())["source"] == "hub"
    assert "warning: could not fill the S3 cache (PermissionError: AccessDenied)" in lines
    assert keys(s3) == set()  # no manifest: the next host does not take it for a hit
