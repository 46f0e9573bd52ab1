"""schemathesis against the gateway's own OpenAPI: no 5xx, no response off its schema."""

import subprocess
import sys
from pathlib import Path

from tests.conftest import GENEROUS, models_config
from tests.support.gateway import start_gateway

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance,negative_data_rejection,ignored_auth,"
          "missing_required_header,unsupported_method,positive_data_acceptance")


def test_schemathesis_finds_no_server_error_or_schema_violation(backends, tmp_path: Path):
    # every declared backend is up here: a 503 for a down model would be a true 5xx
    up = [m for m in models_config(backends) if m["name"] != "ghost"]
    gw = start_gateway(tmp_path / "gw", {"models": up}, {"fuzz": GENEROUS})
    try:
        out = subprocess.run(
            [str(Path(sys.executable).with_name("schemathesis")), "run",
             gw.url + "/openapi.json", "--checks", CHECKS, "--max-examples", "60",
             "--seed", "7", "--generation-database", "none", "--workers", "1",
             "--header", f"Authorization: Bearer {gw.keys['fuzz']}",
             "--request-timeout", "10", "--no-color", "--report", "junit",
             "--report-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=600,
        )
        assert "Traceback" not in gw.proc.log()
    finally:
        gw.stop()
    tail = "\n".join(out.stdout.splitlines()[-60:])
    assert out.returncode == 0, tail
    assert " generated, " in tail and "failures" not in tail
