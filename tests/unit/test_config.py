import re
from pathlib import Path

import pytest
import yaml

from app.config import ConfigError, load_config


def write(tmp_path: Path, data) -> Path:
    p = tmp_path / "gateway.yml"
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


GOOD = {"keys_file": "keys.json",
        "models": [{"name": "text2sql", "backend": "http://127.0.0.1:8000"}]}


def test_valid_config_fills_defaults_and_resolves_keys_file_next_to_it(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    m = cfg.model("text2sql")
    assert m.backend_name == "text2sql" and m.max_tokens == 1024 and m.task == "generate"
    assert cfg.keys_file == tmp_path / "keys.json"
    assert cfg.rate_limit.redis_url is None


def test_unknown_field_is_refused_and_named(tmp_path):
    bad = {**GOOD, "models": [{**GOOD["models"][0], "max_token": 5}]}
    with pytest.raises(ConfigError, match=r"models\.0\.max_token: unknown field"):
        load_config(write(tmp_path, bad))


@pytest.mark.parametrize("models, field", [
    ([{"name": "a", "backend": "not a url"}], "models.0.backend"),
    ([{"name": "a", "backend": "http://x", "max_tokens": 0}], "models.0.max_tokens"),
    ([{"name": "a b", "backend": "http://x"}], "models.0.name"),
    ([], "models"),
])
def test_bad_values_are_named(tmp_path, models, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(write(tmp_path, {**GOOD, "models": models}))


def test_duplicate_model_names_are_refused(tmp_path):
    m = GOOD["models"][0]
    with pytest.raises(ConfigError, match="declared twice"):
        load_config(write(tmp_path, {**GOOD, "models": [m, m]}))


def test_redis_url_must_be_a_redis_url(tmp_path):
    with pytest.raises(ConfigError, match=r"rate_limit\.redis_url"):
        load_config(write(tmp_path, {**GOOD, "rate_limit": {"redis_url": "http://x"}}))
    with pytest.raises(ConfigError, match=r"rate_limit\.timeout_s"):
        load_config(write(tmp_path, {**GOOD, "rate_limit": {"timeout_s": 0}}))
    cfg = load_config(write(tmp_path, {**GOOD, "rate_limit": {"timeout_s": 2}}))
    assert cfg.rate_limit.timeout_s == 2


def test_missing_file_and_bad_yaml_say_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="does not exist.*GATEWAY_CONFIG"):
        load_config(tmp_path / "nope.yml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "models: [\n"))


RL_SECRET = "hunter2-not-logged"


@pytest.mark.parametrize("url", [f"rediss://:{RL_SECRET}@cache.internal:6379/0",
                                 f"rediss://default:{RL_SECRET}@cache.internal/0",
                                 f"unix://:{RL_SECRET}@/run/redis.sock"])
def test_a_password_in_redis_url_is_refused_without_echoing_it(tmp_path, url):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, {**GOOD, "rate_limit": {"redis_url": url}}))
    msg = str(e.value)
    assert "rate_limit.redis_url" in msg and "redis_password_file" in msg
    assert "redis_password_ssm_parameter" in msg
    assert RL_SECRET not in msg


@pytest.mark.parametrize("query", ["?ssl_cert_reqs=none", f"?password={RL_SECRET}",
                                   "?ssl_check_hostname=false", "#x"])
def test_redis_url_options_are_refused_so_none_can_turn_tls_checks_off(tmp_path, query):
    url = "rediss://cache.internal:6379/0" + query
    with pytest.raises(ConfigError, match=r"rate_limit\.redis_url.*query string") as e:
        load_config(write(tmp_path, {**GOOD, "rate_limit": {"redis_url": url}}))
    assert RL_SECRET not in str(e.value)


@pytest.mark.parametrize("rate_limit, says", [
    ({"redis_url": "redis://10.0.0.5:6379/0", "redis_ca_file": "ca.pem"},
     "redis_ca_file is only used with TLS"),
    ({"redis_ca_file": "ca.pem"}, "redis_ca_file is set but redis_url is not"),
    ({"redis_password_file": "pw"}, "redis_password_file is set but redis_url is not"),
    ({"redis_url": "rediss://c:6379", "redis_password_file": "pw",
      "redis_password_ssm_parameter": "/llm/redis"}, "not both"),
    ({"redis_url": "rediss://c:6379", "redis_password_ssm_parameter": "bad name!"},
     "rate_limit.redis_password_ssm_parameter"),
    ({"redis_url": "rediss://c:6379", "redis_password": "x"},
     "rate_limit.redis_password: unknown field"),
])
def test_redis_tls_and_auth_settings_that_do_not_fit_are_refused(tmp_path, rate_limit, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        load_config(write(tmp_path, {**GOOD, "rate_limit": rate_limit}))


def test_redis_ca_and_password_files_resolve_next_to_the_config(tmp_path):
    cfg = load_config(write(tmp_path, {**GOOD, "rate_limit": {
        "redis_url": "rediss://cache.internal:6379/0", "redis_ca_file": "tls/ca.pem",
        "redis_password_file": "/etc/llm-gateway/redis-password"}}))
    assert cfg.rate_limit.redis_ca_file == tmp_path / "tls" / "ca.pem"
    assert cfg.rate_limit.redis_password_file == Path("/etc/llm-gateway/redis-password")
    assert cfg.keys_file == tmp_path / "keys.json"
    ssm = load_config(write(tmp_path, {**GOOD, "rate_limit": {
        "redis_url": "rediss://cache.internal:6379/0",
        "redis_password_ssm_parameter": "arn:aws:ssm:eu-west-1:123456789012:parameter/llm/x"}}))
    assert ssm.rate_limit.redis_ca_file is None
