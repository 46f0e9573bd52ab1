"""Where the Redis password comes from: a file only its owner (and group) may read, or an SSM
SecureString; a source that cannot be used stops the start, naming it and never the secret."""

import logging

import boto3
import pytest
from moto import mock_aws

from app.config import ConfigError, RateLimitConfig
from app.redis_client import read_password

SECRET = "tok-3f9a1c-never-shown"
URL = "rediss://cache.internal:6379/0"


def from_file(path) -> str | None:
    return read_password(RateLimitConfig(redis_url=URL, redis_password_file=path))


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o400, 0o440])
def test_a_password_file_its_owner_and_group_may_read_is_used(tmp_path, mode):
    f = tmp_path / "redis-password"
    f.write_text(SECRET + "\n")  # as `echo` writes it
    f.chmod(mode)
    assert from_file(f) == SECRET


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o660, 0o620, 0o666])
def test_a_password_file_others_may_read_or_the_group_write_is_refused(tmp_path, mode):
    f = tmp_path / "redis-password"
    f.write_text(SECRET)
    f.chmod(mode)
    with pytest.raises(ConfigError) as e:
        from_file(f)
    msg = str(e.value)
    assert str(f) in msg and f"mode {mode:04o}" in msg and "chmod 0600" in msg
    assert SECRET not in msg


def test_a_missing_empty_or_linked_password_file_is_refused_by_name(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=f"redis_password_file {missing} cannot be read"):
        from_file(missing)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    empty.chmod(0o600)
    with pytest.raises(ConfigError, match=f"{empty} is empty"):
        from_file(empty)
    real = tmp_path / "real"
    real.write_text(SECRET)
    real.chmod(0o600)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(ConfigError, match=f"{link} cannot be read"):
        from_file(link)


def test_a_password_path_that_is_a_folder_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match=f"redis_password_file {tmp_path} is not a regular"):
        from_file(tmp_path)


@pytest.fixture
def ssm(monkeypatch):
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "eu-west-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    with mock_aws():
        yield boto3.client("ssm", region_name="eu-west-1")


def from_ssm(name: str) -> str | None:
    return read_password(RateLimitConfig(redis_url=URL, redis_password_ssm_parameter=name))


def test_the_password_is_read_from_an_ssm_securestring_by_name_or_arn(ssm, caplog):
    ssm.put_parameter(Name="/llm-stack/redis-auth", Value=SECRET, Type="SecureString")
    arn = ssm.get_parameter(Name="/llm-stack/redis-auth")["Parameter"]["ARN"]
    # an operator debugging at debug level still must not see it
    caplog.set_level(logging.DEBUG)
    assert from_ssm("/llm-stack/redis-auth") == SECRET
    assert from_ssm(arn) == SECRET
    assert SECRET not in caplog.text
    assert logging.getLogger("botocore").level == logging.NOTSET  # levels are restored
    # why it matters: botocore logs whole response bodies at debug level
    ssm.get_parameter(Name="/llm-stack/redis-auth", WithDecryption=True)
    assert SECRET in caplog.text


def test_an_ssm_parameter_that_is_missing_or_not_encrypted_is_refused_by_name(ssm):
    with pytest.raises(ConfigError, match="/llm-stack/nope: SSM refused to read it: "
                                          "ParameterNotFound"):
        from_ssm("/llm-stack/nope")
    ssm.put_parameter(Name="/llm-stack/plain", Value=SECRET, Type="String")
    with pytest.raises(ConfigError, match="/llm-stack/plain is a String, not a SecureString") \
            as e:
        from_ssm("/llm-stack/plain")
    assert SECRET not in str(e.value)


def test_without_aws_credentials_the_ssm_read_says_so(monkeypatch, tmp_path):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    with pytest.raises(ConfigError, match="/llm-stack/x: SSM could not be asked: "
                                          "Unable to locate credentials"):
        from_ssm("/llm-stack/x")


def test_deploy_time_saves_the_ssm_password_where_the_sandboxed_gateway_reads_it(ssm, tmp_path,
                                                                                 capsys):
    """The gateway unit reaches neither SSM nor the instance's credentials: Ansible runs
    `python -m app.redis_client save-ssm-password` on the host first, and the gateway reads the
    file (root:<group>, 0640), as its own password-file checks accept."""
    import grp
    import os
    import stat

    from app.redis_client import main

    ssm.put_parameter(Name="/llm-stack/redis-auth", Value=SECRET, Type="SecureString")
    dest, group = tmp_path / "redis-password", grp.getgrgid(os.getegid()).gr_name
    args = ["save-ssm-password", "/llm-stack/redis-auth", str(dest), "--group", group]
    assert main(args) == 0 and capsys.readouterr().out == "changed\n"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o640 and dest.stat().st_gid == os.getegid()
    assert from_file(dest) == SECRET
    assert main(args) == 0 and capsys.readouterr().out == "unchanged\n"
    dest.chmod(0o644)  # a wrong mode is repaired, not kept
    assert main(args) == 0 and capsys.readouterr().out == "changed\n"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o640
    ssm.put_parameter(Name="/llm-stack/redis-auth", Value=SECRET + "-2", Type="SecureString",
                      Overwrite=True)
    assert main(args) == 0 and capsys.readouterr().out == "changed\n"
    assert from_file(dest) == SECRET + "-2"
    # a refusal names the parameter, never a secret, and leaves the file as it was
    assert main(["save-ssm-password", "/llm-stack/nope", str(dest), "--group", group]) == 1
    err = capsys.readouterr().err
    assert "/llm-stack/nope: SSM refused to read it" in err and SECRET not in err
    assert from_file(dest) == SECRET + "-2"
