"""Gateway configuration: one YAML file (GATEWAY_CONFIG) validated once at start.

Environment settings (GATEWAY_*) say where to listen and where the YAML is; the YAML says
which models exist and how to reach them. Unknown fields are refused so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict


class ConfigError(Exception):
    """The configuration cannot be used; the message says which field and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRoute(_Strict):
    name: str = Field(description="public model name clients send", pattern=r"^[A-Za-z0-9._:/-]+$")
    backend: AnyHttpUrl = Field(description="base URL of the vLLM OpenAI server")
    served_name: str | None = Field(default=None, description="name the backend serves")
    task: Literal["generate", "embed"] = Field(
        default="generate", description="text generation, or embeddings (vLLM --runner pooling)"
    )
    max_tokens: int = Field(default=1024, gt=0, description="cap on max_tokens per request")
    max_concurrency: int = Field(default=64, gt=0, description="in-flight requests to this backend")
    timeout_s: float = Field(
        default=120.0, gt=0,
        description="deadline of a whole request; for a stream, of each wait for a chunk")
    stream_max_s: float = Field(
        default=900.0, gt=0, description="deadline of a whole stream, however steadily it flows")
    required: bool = Field(default=True, description="whether /ready fails when it is down")

    @property
    def backend_name(self) -> str:
        return self.served_name or self.name

    @property
    def base_url(self) -> str:
        return str(self.backend).rstrip("/")


class RateLimitConfig(_Strict):
    redis_url: str | None = Field(
        default=None,
        description="when set, counters live in Redis and are shared; rediss:// for TLS. "
        "No password here: see redis_password_file and redis_password_ssm_parameter",
    )
    redis_ca_file: Path | None = Field(
        default=None,
        description="PEM CA bundle the rediss:// server's certificate must chain to "
        "(default: the system's CA store, which ElastiCache's certificates chain to); "
        "the certificate and its hostname are always verified",
    )
    redis_password_file: Path | None = Field(
        default=None,
        description="file holding the Redis password or AUTH token, mode 0600 or 0640 at most",
    )
    redis_password_ssm_parameter: str | None = Field(
        default=None, min_length=1, max_length=2048, pattern=r"^[A-Za-z0-9_.:/-]+$",
        description="SSM Parameter Store SecureString (name or ARN) holding the Redis "
        "password or AUTH token, read once at start with the host's AWS credentials",
    )
    window_s: float = Field(default=60.0, gt=0, description="sliding window length")
    on_redis_error: Literal["open", "closed"] = Field(
        default="open", description="serve without counting (open) or refuse with 503 (closed)"
    )
    timeout_s: float = Field(
        default=0.5, gt=0, le=10,
        description="longest wait for Redis (a free connection, then its answer) before "
        "on_redis_error applies",
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        url = urlsplit(v)
        # Never echo the URL back: it may be the very secret being refused.
        if url.password is not None:
            raise ValueError("holds a password, which would then show wherever the URL does: "
                             "put it in rate_limit.redis_password_file or "
                             "rate_limit.redis_password_ssm_parameter instead")
        # redis-py turns every query parameter into a connection option, overriding the
        # gateway's own (ssl_cert_reqs=none would turn certificate checks off unseen)
        if url.query or url.fragment:
            raise ValueError("takes no query string (?...) or fragment: TLS and AUTH are "
                             "set by the other rate_limit settings")
        return v

    @model_validator(mode="after")
    def _redis_settings_fit(self) -> RateLimitConfig:
        auth = [f for f in ("redis_password_file", "redis_password_ssm_parameter")
                if getattr(self, f) is not None]
        if len(auth) > 1:
            raise ValueError("set one of redis_password_file and redis_password_ssm_parameter, "
                             "not both")
        needs_url = auth + (["redis_ca_file"] if self.redis_ca_file is not None else [])
        if needs_url and self.redis_url is None:
            raise ValueError(f"{needs_url[0]} is set but redis_url is not")
        if self.redis_ca_file is not None and not self.redis_url.startswith("rediss://"):
            raise ValueError("redis_ca_file is only used with TLS: make redis_url rediss://")
        return self

    @property
    def redis_password_source(self) -> str | None:
        """Where the password comes from, in words safe to log."""
        if self.redis_password_file is not None:
            return f"rate_limit.redis_password_file {self.redis_password_file}"
        if self.redis_password_ssm_parameter is not None:
            return f"rate_limit.redis_password_ssm_parameter {self.redis_password_ssm_parameter}"
        return None


class ReadyConfig(_Strict):
    timeout_s: float = Field(default=2.0, gt=0, description="deadline of each backend /health")
    interval_s: float = Field(
        default=2.0, gt=0, description="check every backend's /health this often, in the background"
    )
    down_after: int = Field(
        default=2, ge=1, description="consecutive failed checks before a model counts as down"
    )
    deep_probe: bool = Field(
        default=False, description="also send a one-token completion to each generative model"
    )
    deep_probe_timeout_s: float = Field(default=10.0, gt=0)
    deep_probe_interval_s: float = Field(
        default=30.0, gt=0, description="a deep probe costs a generation: run it at most this often"
    )


# s3://<bucket>/<key>: S3's bucket naming rules (lowercase, digits, dots, hyphens; 3-63)
_S3_URL = re.compile(r"^s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])/([^\s]+)$")


def parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, key) of `s3://bucket/key`; ValueError naming the expected form otherwise."""
    m = _S3_URL.match(url)
    if m is None or m.group(2).endswith("/"):
        raise ValueError(f"{url!r} is not s3://<bucket>/<key> (the object, not a folder)")
    return m.group(1), m.group(2)


class KeysS3Config(_Strict):
    """One key set for the whole deployment: the hashed keys object in S3 that every host's
    gateway reads (`python -m app.keys --store s3://...` writes it)."""

    url: str = Field(description="s3://<bucket>/<key> of the hashed keys object")
    region: str | None = Field(
        default=None, pattern=r"^[a-z]{2}(-[a-z]+)+-\d$",
        description="the bucket's region (default: the AWS SDK's, e.g. AWS_DEFAULT_REGION)")
    poll_interval_s: float = Field(
        default=5.0, gt=0, le=300,
        description="ask S3 whether the object changed this often (a conditional GET: an "
        "unchanged object transfers nothing)")
    timeout_s: float = Field(
        default=5.0, gt=0, le=60, description="connect and read deadline of each S3 call")
    cache_file: Path = Field(
        default=Path("/var/lib/llm-gateway/keys.json"),
        description="the last good copy (mode 0600): what the gateway serves, and what it starts "
        "from when S3 cannot be read")

    @field_validator("url")
    @classmethod
    def _s3_url(cls, v: str) -> str:
        parse_s3_url(v)
        return v


class GatewayConfig(_Strict):
    # exactly one of the two: a file on this host's disk, or one S3 object shared by every host
    keys_file: Path | None = Field(
        default=None, description="hashed API keys on this host (python -m app.keys manages it)")
    keys_s3: KeysS3Config | None = Field(
        default=None, description="hashed API keys in one S3 object shared by every host")
    max_body_bytes: int = Field(default=1_048_576, gt=0)
    max_response_bytes: int = Field(
        default=64 << 20, gt=0,
        description="largest non-streaming backend answer held in memory (502 above it)")
    drain_notice_s: float = Field(
        default=5.0, ge=0,
        description="after SIGTERM or SIGUSR1 (drain), /ready answers 503 this long while "
        "requests are still served, so load balancers take the host out before the listener "
        "closes or new requests are refused",
    )
    drain_timeout_s: float = Field(default=30.0, ge=0, description="SIGTERM grace for streams")
    # Longer than nginx's upstream keepalive_timeout (60 s) so that nginx, not the gateway,
    # closes idle connections and never sends on one the gateway is closing. uvicorn's
    # httptools protocol offers no header-read timeout nor header size or count limits:
    # nginx enforces those in front (client_header_timeout, large_client_header_buffers).
    keepalive_timeout_s: int = Field(
        default=75, gt=0, description="close an idle keep-alive connection after this long"
    )
    rate_limit: RateLimitConfig = RateLimitConfig()
    ready: ReadyConfig = ReadyConfig()
    models: list[ModelRoute] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_key_source(self) -> GatewayConfig:
        if (self.keys_file is None) == (self.keys_s3 is None):
            raise ValueError(
                "set exactly one of keys_file (the keys on this host's disk) or keys_s3 (one key "
                "set in S3 that every host reads), " +
                ("not both" if self.keys_file is not None else "found neither"))
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> GatewayConfig:
        seen: set[str] = set()
        for m in self.models:
            if m.name in seen:
                raise ValueError(f"model name {m.name!r} is declared twice")
            seen.add(m.name)
        return self

    def model(self, name: str) -> ModelRoute | None:
        return next((m for m in self.models if m.name == name), None)


class Settings(BaseSettings):
    """Process settings from the environment."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    config: Path = Path("/etc/llm-gateway/gateway.yml")
    log_level: Literal["debug", "info", "warning", "error"] = "info"


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (remove it or check its spelling)"
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def load_config(path: Path | str) -> GatewayConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist (set GATEWAY_CONFIG)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping with at least 'models'")
    try:
        cfg = GatewayConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"config file {path} is invalid:\n{_describe(e)}") from None
    # relative paths are relative to the config file
    if cfg.keys_file is not None and not cfg.keys_file.is_absolute():
        cfg = cfg.model_copy(update={"keys_file": (path.parent / cfg.keys_file).resolve()})
    if cfg.keys_s3 is not None and not cfg.keys_s3.cache_file.is_absolute():
        s3 = cfg.keys_s3.model_copy(
            update={"cache_file": (path.parent / cfg.keys_s3.cache_file).resolve()})
        cfg = cfg.model_copy(update={"keys_s3": s3})
    rl = cfg.rate_limit
    files = {f: (path.parent / getattr(rl, f)).resolve()
             for f in ("redis_ca_file", "redis_password_file")
             if getattr(rl, f) is not None and not getattr(rl, f).is_absolute()}
    if files:
        cfg = cfg.model_copy(update={"rate_limit": rl.model_copy(update=files)})
    return cfg


def settings_from_env() -> Settings:
    try:
        return Settings()
    except ValidationError as e:
        raise ConfigError(f"bad GATEWAY_* environment variable:\n{_describe(e)}") from None


def config_path_from_env() -> Path:
    return Path(os.environ.get("GATEWAY_CONFIG", Settings.model_fields["config"].default))
