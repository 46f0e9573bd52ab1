"""The keys file as a running gateway sees it: a bad file at reload is refused (the last good
set stays, revocations included) and reported; a bad file at start stops the process."""

import json
import subprocess
import sys

import httpx
import yaml

from app import keys as keys_cli
from tests.conftest import models_config
from tests.support.gateway import start_gateway
from tests.support.procs import wait_until


def _status(gw, key: str) -> int:
    return httpx.get(gw.url + "/v1/models", headers=gw.auth(key)).status_code


def test_a_corrupt_keys_file_keeps_the_last_good_set_and_moves_the_metrics(backends, tmp_path):
    gw = start_gateway(tmp_path, {"models": models_config(backends)}, {"alice": [], "bob": []})
    keys_file = tmp_path / "keys.json"
    try:
        assert gw.metrics().count("gateway_keys_last_reload_ok 1.0") == 1
        assert keys_cli.main(["--file", str(keys_file), "revoke", "bob"]) == 0
        wait_until(lambda: _status(gw, "bob") == 401, what="bob's revocation")
        good = keys_file.read_text()
        digests = [r["hash"] for r in json.loads(good)["keys"]]

        # a type-wrong file: before, it was ignored silently or made requests fail
        data = json.loads(good)
        for r in data["keys"]:
            r["rpm"], r["revoked_at"] = "60", None
        keys_file.write_text(json.dumps(data))
        # no request needed: the gateway notices by itself
        wait_until(lambda: "gateway_keys_last_reload_ok 0.0" in gw.metrics(),
                   what="the reload failure showing in /metrics")
        assert "gateway_keys_reload_failures_total 1.0" in gw.metrics()
        assert _status(gw, "alice") == 200
        assert _status(gw, "bob") == 401  # the revoked key stays revoked

        keys_file.write_text("{not json")
        wait_until(lambda: "gateway_keys_reload_failures_total 2.0" in gw.metrics(),
                   what="the second failure counted")
        assert (_status(gw, "alice"), _status(gw, "bob")) == (200, 401)

        lines = [json.loads(line) for line in gw.log_lines()]
        errors = [e for e in lines if e["level"] == "error"]
        assert len(errors) == 2, errors  # one line per bad version of the file
        for e in errors:
            assert "keeping the last good set of 2 keys" in e["msg"] and "exc" not in e
            assert not any(d in e["msg"] for d in digests)

        keys_file.write_text(good)
        wait_until(lambda: "gateway_keys_last_reload_ok 1.0" in gw.metrics(),
                   what="recovery showing in /metrics")
    finally:
        gw.stop()


def test_a_bad_keys_file_at_start_exits_2_with_one_line(tmp_path):
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps({"keys": [{"name": "x", "models": "*"}]}))
    cfg = tmp_path / "gateway.yml"
    cfg.write_text(yaml.safe_dump({"keys_file": str(keys_file),
                                   "models": [{"name": "a", "backend": "http://127.0.0.1:9"}]}))
    for problem in ("field 'created_at' is missing", "does not exist"):
        out = subprocess.run([sys.executable, "-m", "app"], capture_output=True, text=True,
                             env={"GATEWAY_CONFIG": str(cfg)}, timeout=30)
        assert out.returncode == 2
        assert out.stderr.count("\n") == 1 and problem in out.stderr, out.stderr
        assert out.stderr.startswith(f"error: keys file {keys_file}")
        keys_file.unlink(missing_ok=True)
