"""One key set for the deployment: the hashed keys file as one S3 object every host reads.

The object holds exactly what a keys file holds (app/keys.py): ids, names, limits and
SHA-256 hashes, never a key. Terraform keeps it in a versioned bucket encrypted with a KMS key
of its own; the hosts' role may read that one object, operators write it with their own
credentials.

Gateway (`KeysMirror`): the object is read at start, then polled with a conditional GET
(If-None-Match: the ETag in force) every `poll_interval_s`, so an unchanged object costs one
small request and no transfer. A good new version is written to the local cache file (mode
0600, atomically) and the KeyStore reloads from that file: the request path stays a dict
lookup, as with a keys file. What cannot be read (S3 unreachable, access denied, object gone)
or used (not JSON, a bad record) leaves the last good set in force and is logged without a
key or a hash. With no S3 at start the cache file is served; with neither the gateway does not
start. boto3 blocks, so the polls run in a worker thread, never on the event loop.

CLI (`python -m app.keys --store s3://...`): read-modify-write with S3's conditional write,
PutObject If-Match the ETag that was read (If-None-Match: * when there is no object yet). When
another writer got in between, S3 refuses the write (412, or 409 for writes at the same
instant) and the change is made again on the version that won: two concurrent `create`s both
land, and two creates of one name leave one key and one clear refusal.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from app.config import KeysS3Config, parse_s3_url
from app.keys import KeyRecord, KeyStore, KeyStoreError, parse_records, records_json, write_records

if TYPE_CHECKING:
    from app.metrics import Metrics

log = logging.getLogger("gateway.keys")

T = TypeVar("T")

# a warning when polls start failing, then one at most this often while they still fail
_REPEAT_WARNING_S = 60.0


class KeysObjectUnreachable(KeyStoreError):
    """S3 did not answer, or refused (credentials, permissions, KMS)."""


class KeysObjectMissing(KeyStoreError):
    """There is no object at the URL."""


class KeysObjectRejected(KeyStoreError):
    """The object is there but is not a usable key set."""


class KeysObjectConflict(Exception):
    """Another writer changed the object since it was read."""


def _status(err) -> tuple[int | None, str]:
    response = getattr(err, "response", None) or {}
    return (response.get("ResponseMetadata", {}).get("HTTPStatusCode"),
            response.get("Error", {}).get("Code", ""))


class KeysObject:
    """The keys object: a full or conditional read, and a conditional write."""

    def __init__(self, url: str, region: str | None = None, timeout_s: float = 5.0,
                 attempts: int = 3):
        # imported here: a gateway with a keys file never loads the AWS SDK
        import boto3
        from botocore.config import Config

        self.url = url
        self.bucket, self.key = parse_s3_url(url)
        # the endpoint comes from the SDK's own settings (AWS_ENDPOINT_URL_S3 ...), the
        # credentials from its chain: the instance role on a host, the operator's profile
        self._client = boto3.client("s3", region_name=region, config=Config(
            connect_timeout=timeout_s, read_timeout=timeout_s,
            retries={"mode": "standard", "max_attempts": attempts}))

    def _unreachable(self, err: Exception, doing: str) -> KeysObjectUnreachable:
        status, code = _status(err)
        if code:
            message = (getattr(err, "response", {}).get("Error", {}).get("Message") or "").strip()
            why = f"{code} (HTTP {status})" + (f": {message}" if message else "")
        else:
            why = str(err) or type(err).__name__
        return KeysObjectUnreachable(f"keys object {self.url} cannot be {doing}: {why}")

    def get(self, etag: str | None = None) -> tuple[bytes, str] | None:
        """(body, ETag) of the object; None when it still has `etag` (nothing transferred)."""
        from botocore.exceptions import BotoCoreError, ClientError

        extra = {"IfNoneMatch": etag} if etag else {}
        try:
            got = self._client.get_object(Bucket=self.bucket, Key=self.key, **extra)
            return got["Body"].read(), got["ETag"]
        except ClientError as e:
            status, code = _status(e)
            if status == 304:
                return None
            if code in ("NoSuchKey", "404"):
                raise KeysObjectMissing(f"keys object {self.url} does not exist") from None
            raise self._unreachable(e, "read") from None
        except BotoCoreError as e:
            raise self._unreachable(e, "read") from None

    def put(self, body: bytes, etag: str | None) -> str:
        """Write `body` if the object still has `etag` (None: if there is no object yet); the
        new ETag. KeysObjectConflict when another writer got there first."""
        from botocore.exceptions import BotoCoreError, ClientError

        condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        try:
            # encrypted by the bucket's default (SSE-KMS with the key store's own key)
            put = self._client.put_object(Bucket=self.bucket, Key=self.key, Body=body,
                                          ContentType="application/json", **condition)
            return put["ETag"]
        except ClientError as e:
            status, code = _status(e)
            # 412: the ETag moved on; 409: a write at the same instant; 404 under If-Match:
            # deleted meanwhile (the next read sees that and creates it again)
            if status in (409, 412) or (etag and code == "NoSuchKey"):
                raise KeysObjectConflict() from None
            raise self._unreachable(e, "written") from None
        except BotoCoreError as e:
            raise self._unreachable(e, "written") from None

    def parse(self, body: bytes) -> list[KeyRecord]:
        try:
            return parse_records(body.decode())
        except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
            raise KeysObjectRejected(
                f"keys object {self.url} is malformed: {e}; restore a good version (the bucket "
                "keeps every version: aws s3api list-object-versions)") from None


class S3Keys:
    """The key set the CLI changes: `read`, and `update` by conditional read-modify-write."""

    def __init__(self, url: str, region: str | None = None, attempts: int = 10,
                 notice: Callable[[str], None] | None = None):
        self.obj = KeysObject(url, region)
        self.attempts = attempts
        self.notice = notice or (lambda _msg: None)

    def _read(self) -> tuple[list[KeyRecord], str | None]:
        try:
            body, etag = self.obj.get()
        except KeysObjectMissing:
            return [], None  # the first `create` makes it, as with a keys file
        return self.obj.parse(body), etag

    def read(self) -> list[KeyRecord]:
        return self._read()[0]

    def update(self, change: Callable[[list[KeyRecord]], T]) -> T:
        """Apply `change` to the current records and write them back, unless another writer
        changed the object meanwhile: then read again and apply `change` to that version.
        `change` runs once per attempt on fresh records; what it returns is returned."""
        for attempt in range(1, self.attempts + 1):
            records, etag = self._read()
            result = change(records)
            try:
                self.obj.put(records_json(records).encode(), etag)
                return result
            except KeysObjectConflict:
                self.notice(f"the key set in {self.obj.url} changed while this command ran "
                            "(another writer): applying the change to the new version")
                # writers that collided spread out before trying again
                time.sleep(random.uniform(0.05, 0.2) * attempt)
        raise KeyStoreError(f"keys object {self.obj.url} kept changing during {self.attempts} "
                            "attempts; nothing was written: try again")


class KeysMirror:
    """Keeps `cache_file` the last good version of the keys object; the KeyStore serves it."""

    def __init__(self, cfg: KeysS3Config, metrics: Metrics | None = None,
                 on_reload: Callable[[bool], None] | None = None):
        self.cfg = cfg
        self.cache_file = cfg.cache_file
        # one retry inside a poll: the next poll is seconds away anyway
        self.obj = KeysObject(cfg.url, cfg.region, cfg.timeout_s, attempts=2)
        self.metrics = metrics
        self.on_reload = on_reload
        self.etag: str | None = None  # of the version last read, good or refused
        self._failing_since: float | None = None
        self._warned_at = 0.0
        self._failed_reads = 0
        # said once logging is set up (the gateway logs JSON only once it serves)
        self._start_notes: list[tuple[int, str]] = []
        if metrics is not None:
            metrics.track_key_store()

    # ---------------------------------------------------------------- start

    def load_at_start(self) -> None:
        """Fetch the object into the cache file; or, when it cannot be, keep the cache file
        there is. KeyStoreError when there is neither: the gateway must not start without its
        key set (every client would get 401)."""
        try:
            body, etag = self.obj.get()  # never None: no ETag was sent
            self.etag = etag
            records = self.obj.parse(body)
        except KeyStoreError as e:
            if not self.cache_file.exists():
                raise KeyStoreError(
                    f"{e}; and there is no last good copy at {self.cache_file}: the gateway "
                    "does not start without its key set") from None
            if isinstance(e, KeysObjectRejected):
                self._synced()
                if self.on_reload:
                    self.on_reload(False)
                self._start_notes.append((logging.ERROR, f"{e}; serving the last good copy "
                                          f"{self.cache_file}"))
            else:
                self._count_failure(e, at_start=True)
            return
        write_records(self.cache_file, records)
        self._synced()

    # ---------------------------------------------------------------- polling

    async def run(self, store: KeyStore) -> None:
        """Poll forever (the gateway's background task)."""
        for level, note in self._start_notes:
            log.log(level, note)
        self._start_notes.clear()
        while True:
            await asyncio.sleep(self.cfg.poll_interval_s)
            try:
                await self.poll(store)
            except Exception:
                log.exception("polling the keys object failed unexpectedly")

    def _fetch(self) -> int | None:
        """In a worker thread: the new version's key count once it is in the cache file;
        None when the object is unchanged."""
        got = self.obj.get(self.etag)
        if got is None:
            return None
        body, etag = got
        # remembered before parsing: a bad version is refused (and reported) once, not on
        # every poll; the next good one has another ETag
        self.etag = etag
        records = self.obj.parse(body)
        write_records(self.cache_file, records)
        return len(records)

    async def poll(self, store: KeyStore) -> None:
        try:
            count = await asyncio.to_thread(self._fetch)
        except KeysObjectRejected as e:
            self._synced()
            log.error("%s; keeping the last good set of %d keys", e, len(store))
            if self.on_reload:
                self.on_reload(False)
            return
        except KeyStoreError as e:
            self._count_failure(e, store=store)
            return
        self._synced()
        if count is None:
            return
        store.reload()  # the cache file just written: small, and read only on a change
        log.info("keys object %s changed: %d keys in force", self.obj.url, count)
        if self.on_reload:
            self.on_reload(True)

    # ---------------------------------------------------------------- reporting

    def _synced(self) -> None:
        if self.metrics is not None:
            self.metrics.keys_store_synced.set(time.time())
        if self._failing_since is not None:
            log.info("keys object %s readable again after %d failed reads (%.0f s)",
                     self.obj.url, self._failed_reads, time.monotonic() - self._failing_since)
            self._failing_since = None
            self._failed_reads = 0

    def _count_failure(self, err: KeyStoreError, store: KeyStore | None = None,
                       at_start: bool = False) -> None:
        if self.metrics is not None:
            self.metrics.keys_store_errors.inc()
        now = time.monotonic()
        self._failed_reads += 1
        if at_start:
            self._failing_since = self._warned_at = now
            self._start_notes.append((logging.WARNING, (
                f"{err}; serving the last good copy {self.cache_file} until it can be read")))
            return
        count = len(store) if store is not None else 0
        if self._failing_since is None:
            self._failing_since = self._warned_at = now
            log.warning("%s; keeping the last good set of %d keys", err, count)
        elif now - self._warned_at >= _REPEAT_WARNING_S:
            self._warned_at = now
            log.warning("%s; keeping the last good set of %d keys (failing for %.0f s, %d "
                        "reads)", err, count, now - self._failing_since, self._failed_reads)
