"""How the gateway reaches the shared rate-limit store: TLS, AUTH, and riding out a failover.

- TLS (`rediss://`): the server's certificate must chain to `redis_ca_file`, or to the system's
  CA store, and name the host in the URL. There is no switch to turn either check off.
- AUTH: the password comes from a file only its owner (and group) can read, or from an SSM
  SecureString read once at start; never from the YAML or the URL. It goes to redis-py and
  nowhere else: no message, log line or metric of the gateway carries it.
- Failover: ElastiCache promotes a replica behind the same primary endpoint name. Connections
  broken by it are dropped and reopened by redis-py's pool; connections still open to the
  demoted primary answer writes with READONLY, which is made a connection error here so the
  pool drops them and the next connection resolves the endpoint again. Meanwhile requests
  follow `on_redis_error`, as for any outage.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import logging
import os
import ssl
import stat
import sys
from pathlib import Path
from urllib.parse import urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.connection import parse_url
from redis.exceptions import AuthenticationError, ReadOnlyError, RedisError, ResponseError
from redis.maint_notifications import MaintNotificationsConfig

from app.config import ConfigError, RateLimitConfig

log = logging.getLogger("gateway.limits")

# connection pools are bounded; a burst waits for a free connection rather than failing
MAX_CONNECTIONS = 64
# reading the SSM parameter at start: bounded, so a host without a route to SSM fails soon
_SSM_TIMEOUT_S = 5
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


class PrimaryDemoted(redis.ConnectionError):
    """The server answered READONLY: it was the primary when the connection opened and is a
    replica now (a failover). The connection is closed; the next one finds the new primary."""


class _DropOnReadOnly:
    """Mixin for redis-py's async connections: READONLY becomes a connection error, after
    closing the connection (what redis-py's own Sentinel client does)."""

    answered_as_replica = False

    async def read_response(self, *args, **kwargs):
        try:
            return await super().read_response(*args, **kwargs)
        except ReadOnlyError:
            self.answered_as_replica = True
            await self.disconnect()
            raise PrimaryDemoted("the Redis server is a read-only replica now (failover); "
                                 "reconnecting") from None


class _Connection(_DropOnReadOnly, aioredis.Connection):
    pass


class _SSLConnection(_DropOnReadOnly, aioredis.SSLConnection):
    pass


class _UnixConnection(_DropOnReadOnly, aioredis.UnixDomainSocketConnection):
    pass


class _FailoverPool(aioredis.BlockingConnectionPool):
    """When one connection finds the primary demoted, every idle connection was opened to the
    same server, alive and well as far as the pool can tell: close them all at once instead of
    failing one batch on each."""

    async def release(self, connection) -> None:
        await super().release(connection)
        if connection.answered_as_replica:
            connection.answered_as_replica = False
            await self.disconnect(inuse_connections=False)


def _scheme(url: str) -> str:
    return urlsplit(url).scheme


def _connection_options(url: str, timeout_s: float, password: str | None,
                        ca_file: Path | None) -> dict:
    options: dict = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if password is not None:
        options["password"] = password
    if _scheme(url) == "rediss":
        # what redis-py does by default too; spelled out because it is the security boundary
        options.update(ssl_cert_reqs=ssl.CERT_REQUIRED, ssl_check_hostname=True,
                       ssl_ca_certs=str(ca_file) if ca_file is not None else None,
                       ssl_min_version=ssl.TLSVersion.TLSv1_2)
    return options


def connection_pool(url: str, timeout_s: float, password: str | None = None,
                    ca_file: Path | None = None) -> aioredis.BlockingConnectionPool:
    """The limiter's pool: it waits up to `timeout_s` for a free connection, each connect and
    each answer, and never retries on its own (on_redis_error decides what a failure means)."""
    # not from_url: it lets the URL's options (its connection class among them) win
    address = parse_url(url)
    address.pop("connection_class", None)
    connection_class = {"rediss": _SSLConnection, "unix": _UnixConnection}.get(
        _scheme(url), _Connection)
    return _FailoverPool(
        max_connections=MAX_CONNECTIONS, timeout=timeout_s, connection_class=connection_class,
        # redis-py 8 defaults these to "auto", which (a) skips the pool's check that an idle
        # connection is still open before handing it out (seen here: after a Redis restart
        # every pooled connection failed its first batch), and (b) may stretch timeouts to
        # 10 s while a server announces maintenance, past timeout_s. Dead connections are
        # what the gateway must notice; on_redis_error covers the rest.
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
        **{**address, **_connection_options(url, timeout_s, password, ca_file)})


def read_password(rl: RateLimitConfig) -> str | None:
    """The Redis password from the configured file or SSM parameter; None when neither is set.
    A source that cannot be used stops the gateway (ConfigError naming the source)."""
    if rl.redis_password_file is not None:
        return _read_password_file(rl.redis_password_file)
    if rl.redis_password_ssm_parameter is not None:
        return _read_ssm_parameter(rl.redis_password_ssm_parameter)
    return None


def _read_password_file(path: Path) -> str:
    where = f"rate_limit.redis_password_file {path}"
    try:
        # no symlinks: the mode checked must be the file's own
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise ConfigError(f"{where} cannot be read: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{where} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o037:
            raise ConfigError(
                f"{where} is mode {mode:04o}: a password file may be readable by its owner and "
                "group only (chmod 0600, or 0640 with the gateway's group)")
        with os.fdopen(os.dup(fd), "rb") as f:
            text = f.read().decode()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where} cannot be read as text: {type(e).__name__}") from None
    finally:
        os.close(fd)
    password = text.rstrip("\r\n")
    if not password:
        raise ConfigError(f"{where} is empty")
    return password


@contextlib.contextmanager
def _quiet_aws_sdk():
    # botocore logs whole response bodies at debug level, the decrypted parameter included
    loggers = [logging.getLogger(n) for n in ("boto3", "botocore", "urllib3")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _read_ssm_parameter(name: str) -> str:
    # imported here: a gateway without this setting never pays for loading the AWS SDK
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    where = f"rate_limit.redis_password_ssm_parameter {name}"
    # an ARN names its region; a plain name uses the SDK's chain (AWS_DEFAULT_REGION, then
    # the instance metadata's; botocore does not read AWS_REGION)
    region = name.split(":")[3] if name.startswith("arn:") and name.count(":") >= 5 else None
    config = Config(connect_timeout=_SSM_TIMEOUT_S, read_timeout=_SSM_TIMEOUT_S,
                    retries={"mode": "standard", "max_attempts": 3})
    with _quiet_aws_sdk():
        try:
            # a session of its own: nothing cached process-wide decides whose credentials
            client = boto3.session.Session().client("ssm", region_name=region, config=config)
            parameter = client.get_parameter(Name=name, WithDecryption=True)["Parameter"]
        except ClientError as e:
            err = e.response.get("Error", {})
            raise ConfigError(f"{where}: SSM refused to read it: {err.get('Code', '?')} "
                              f"({err.get('Message', '')})") from None
        except BotoCoreError as e:
            raise ConfigError(f"{where}: SSM could not be asked: {e}") from None
    if parameter.get("Type") != "SecureString":
        raise ConfigError(f"{where} is a {parameter.get('Type')}, not a SecureString: store the "
                          "password encrypted (put-parameter --type SecureString)")
    if not parameter.get("Value"):
        raise ConfigError(f"{where} is empty")
    return parameter["Value"]


def check_at_start(rl: RateLimitConfig, password: str | None) -> None:
    """One PING before the gateway listens. A refused password or certificate is a mistake
    that no retry mends: stop now, with the reason, rather than serve every request on
    `on_redis_error` for good. Redis merely unreachable (down, restarting, a failover) is not
    a reason to stay down: the gateway starts and follows `on_redis_error` until it is back."""
    u = urlsplit(rl.redis_url)
    if password is not None and u.scheme == "redis" and u.hostname not in _LOOPBACK:
        log.warning("the Redis password goes unencrypted to %s: use a rediss:// URL",
                    _where(rl.redis_url))
    pool = redis.ConnectionPool.from_url(
        rl.redis_url, **_connection_options(rl.redis_url, max(rl.timeout_s, 2.0), password,
                                            rl.redis_ca_file))
    client = redis.Redis(connection_pool=pool)
    target = _where(rl.redis_url)
    try:
        client.ping()
    except AuthenticationError as e:
        source = rl.redis_password_source
        if source is None:
            raise ConfigError(f"Redis at {target} wants a password: set "
                              "rate_limit.redis_password_file or "
                              f"rate_limit.redis_password_ssm_parameter ({e})") from None
        raise ConfigError(f"Redis at {target} refused the password from {source}: {e}") from None
    except ResponseError as e:  # e.g. a password sent to a server that has none
        raise ConfigError(f"Redis at {target} refused the connection: {e}") from None
    except RedisError as e:
        reason = _tls_refusal(e)
        if reason is not None:
            ca = rl.redis_ca_file or "the system's CA store"
            raise ConfigError(f"Redis at {target}: its TLS certificate was refused ({reason}); "
                              f"it must chain to {ca} and name the host in redis_url") from None
        log.warning("Redis at %s is unreachable at start (%s); serving with on_redis_error=%s "
                    "until it answers", target, type(e).__name__, rl.on_redis_error)
    finally:
        client.close()
        pool.disconnect()


def _where(url: str) -> str:
    u = urlsplit(url)
    return u.path if u.scheme == "unix" else f"{u.scheme}://{u.hostname}:{u.port or 6379}"


def _tls_refusal(e: BaseException) -> str | None:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ssl.SSLCertVerificationError):
            return e.verify_message or "certificate verify failed"
        e = e.__cause__ or e.__context__
    return None


def save_ssm_password(name: str, dest: Path, group: str) -> bool:
    """Deploy time, as root on the host: the SSM password into the file the gateway reads
    (root:<group>, 0640, written atomically). The gateway's own sandbox reaches neither SSM
    nor the instance's credentials, so this runs outside it. True when the file changed."""
    password = _read_ssm_parameter(name)
    gid = grp.getgrnam(group).gr_gid
    try:
        st = dest.stat()
        if (dest.read_text().rstrip("\r\n") == password and stat.S_IMODE(st.st_mode) == 0o640
                and (st.st_uid, st.st_gid) == (os.geteuid(), gid)):
            return False
    except FileNotFoundError:
        pass
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchown(fd, os.geteuid(), gid)
        os.fchmod(fd, 0o640)
        os.write(fd, password.encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, dest)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m app.redis_client",
        description="save-ssm-password NAME FILE --group G: the shared cache's password from "
        "SSM (instance role, AWS_DEFAULT_REGION) into FILE; prints changed or unchanged")
    sub = ap.add_subparsers(dest="cmd", required=True)
    save = sub.add_parser("save-ssm-password")
    save.add_argument("name")
    save.add_argument("file", type=Path)
    save.add_argument("--group", required=True)
    args = ap.parse_args(argv)
    try:
        changed = save_ssm_password(args.name, args.file, args.group)
    except (ConfigError, KeyError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("changed" if changed else "unchanged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
