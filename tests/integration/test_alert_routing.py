"""Alerts reach people: the Alertmanager config rendered from monitoring/alertmanager.yml.j2 (the
monitoring role's template) run by the real Alertmanager on loopback, fed by a real Prometheus
or by amtool, delivering

- to Amazon SNS (moto's server on a free loopback port), whose topic has an SQS queue
  subscribed: the alert must arrive in the queue;
- by e-mail to an SMTP sink on loopback that demands the configured login: the message must
  name the alert;
- nowhere (receiver none), with a model's warning held back while its ModelBackendDown fires.

Everything runs on 127.0.0.1 and is stopped by the PID the test started. The timings are the
role's except group_wait, shortened so the tests take seconds.
"""

from __future__ import annotations

import json
import shutil
import threading
from email import message_from_bytes
from email.message import Message
from pathlib import Path

import boto3
import httpx
import pytest
import yaml
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from monitoring.render import render_alertmanager, render_config
from tests.support.procs import Proc, free_port, wait_until

ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
AMTOOL = shutil.which("amtool")
PROMETHEUS = shutil.which("prometheus")
REGION = "us-east-1"
FAST = {"monitoring_alert_group_wait": "1s", "monitoring_alert_group_interval": "2s"}
# the credentials moto accepts; on a host the instance role's come from the metadata service
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SESSION_TOKEN": "testing", "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(autouse=True, scope="module")
def _binaries():
    missing = [n for n, b in [("prometheus-alertmanager", ALERTMANAGER), ("amtool", AMTOOL),
                              ("prometheus", PROMETHEUS)] if b is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: run `make deps` (Debian packages "
                    "prometheus and prometheus-alertmanager)")


def start_alertmanager(tmp: Path, config_text: str, env: dict | None = None) -> tuple[str, Proc]:
    """Alertmanager as the role runs it (loopback, no clustering), config checked by amtool."""
    config = tmp / "alertmanager.yml"
    config.write_text(config_text)
    check = Proc("amtool-check", [AMTOOL, "check-config", str(config)], tmp / "amtool.log")
    assert check.popen.wait(30) == 0, check.log()
    check.stop()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = Proc("alertmanager", [
        ALERTMANAGER, f"--config.file={config}", f"--storage.path={tmp / 'am-data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=",
    ], tmp / "alertmanager.log", env={
        # no shared credentials or config files of the machine's user
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "none"), "AWS_CONFIG_FILE": str(tmp / "none"),
        **(env or {})})
    proc.wait_http(f"{url}/-/ready")
    return url, proc


def amtool_alert_add(am_url: str, tmp: Path, *labels: str, summary: str) -> None:
    """What docs/monitoring.md tells an operator to run on the host to test delivery."""
    add = Proc("amtool-add", [AMTOOL, f"--alertmanager.url={am_url}", "alert", "add", *labels,
                              f"--annotation=summary={summary}"], tmp / "amtool-add.log")
    assert add.popen.wait(30) == 0, add.log()
    add.stop()


# ------------------------------------------------------------------ SNS through moto


@pytest.fixture()
def topic_with_queue(moto_server):
    """An SNS topic with an SQS queue subscribed, as an operator would subscribe a consumer."""
    kw = {"endpoint_url": moto_server, "region_name": REGION,
          "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    sns, sqs = boto3.client("sns", **kw), boto3.client("sqs", **kw)
    topic = sns.create_topic(Name="llm-alerts",
                             Attributes={"KmsMasterKeyId": "alias/aws/sns"})["TopicArn"]
    queue = sqs.create_queue(QueueName="llm-alerts-inbox")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])[
        "Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=queue_arn)
    yield topic, sqs, queue
    sqs.delete_queue(QueueUrl=queue)
    sns.delete_topic(TopicArn=topic)


def test_sns_config_names_no_credentials():
    text = render_alertmanager(monitoring_alert_receiver="sns",
                               monitoring_alert_sns_topic_arn=f"arn:aws:sns:{REGION}:123456789012:t")
    sns = yaml.safe_load(text)["receivers"][0]["sns_configs"][0]
    # signed with the instance role's credentials: nothing secret in the file
    assert sns["sigv4"] == {"region": REGION}
    assert "api_url" not in sns  # the region's own endpoint


def test_a_prometheus_alert_reaches_an_sqs_queue_subscribed_to_the_topic(
        topic_with_queue, moto_server, tmp_path):
    topic, sqs, queue = topic_with_queue
    am_url, am = start_alertmanager(tmp_path, render_alertmanager(
        monitoring_alert_receiver="sns", monitoring_alert_sns_topic_arn=topic,
        monitoring_alert_sns_api_url=moto_server, **FAST), env=FAKE_AWS)

    # a real Prometheus with the scrape config the role renders (alerting: on this
    # Alertmanager) and one rule that fires at once
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "routing.rules.yml").write_text(yaml.safe_dump({"groups": [{
        "name": "routing-test", "rules": [{
            "alert": "AlertRoutingTest", "expr": "vector(1)",
            "labels": {"severity": "critical", "host": "gpu-7", "model": "tiny-sql"},
            "annotations": {"summary": "routing test alert from Prometheus"}}]}]}))
    prom_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(render_config(
        monitoring_scrape_interval="1s", monitoring_rules_dir=str(rules),
        monitoring_prometheus_listen=f"127.0.0.1:{prom_port}",
        monitoring_alertmanagers=[am_url.removeprefix("http://")]))
    prom = Proc("prometheus", [
        PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'prom'}",
        f"--web.listen-address=127.0.0.1:{prom_port}",
        # Prometheus finds its Alertmanagers a few seconds after its first evaluation, and
        # sends a firing alert again only after this delay (1m by default)
        "--rules.alert.resend-delay=1s"], tmp_path / "prometheus.log")
    try:
        prom.wait_http(f"http://127.0.0.1:{prom_port}/-/ready", timeout=60)

        def received() -> list[dict]:
            return sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10,
                                       WaitTimeSeconds=1).get("Messages", [])

        try:
            messages = wait_until(received, timeout=45, what="the alert in the SQS queue")
        except AssertionError:
            raise AssertionError(f"nothing arrived.\nalertmanager:\n{am.log()}\n"
                                 f"prometheus:\n{prom.log()[-3000:]}") from None
    finally:
        prom.stop()
        am.stop()

    envelope = json.loads(messages[0]["Body"])  # SNS' envelope around Alertmanager's message
    assert envelope["TopicArn"] == topic
    assert envelope["Subject"].startswith("[FIRING] AlertRoutingTest gpu-7 tiny-sql")
    assert "alertname = AlertRoutingTest" in envelope["Message"]
    assert "routing test alert from Prometheus" in envelope["Message"]


# ------------------------------------------------------------------ e-mail to an SMTP sink

SMTP_USER, SMTP_PASSWORD = "alerts", "s3cret-for-the-test"


class Sink:
    """Keeps every message; accepts only the configured login."""

    def __init__(self):
        self.messages: list[Message] = []
        self.logins: list[tuple[bytes, bytes]] = []
        self.got = threading.Event()

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's hook
        self.messages.append(message_from_bytes(envelope.content))
        self.got.set()
        return "250 OK"

    def authenticate(self, server, session, envelope, mechanism, auth_data):
        if isinstance(auth_data, LoginPassword):
            self.logins.append((auth_data.login, auth_data.password))
            ok = (auth_data.login, auth_data.password) == (SMTP_USER.encode(),
                                                           SMTP_PASSWORD.encode())
            return AuthResult(success=ok)
        return AuthResult(success=False)


@pytest.fixture()
def smtp_sink():
    sink = Sink()
    port = free_port()
    # PLAIN, as Go's mail client speaks it; aiosmtpd's LOGIN prompts differ from the usual
    controller = Controller(sink, hostname="127.0.0.1", port=port, authenticator=sink.authenticate,
                            auth_required=True, auth_require_tls=False,
                            auth_exclude_mechanism=["LOGIN"])
    controller.start()
    try:
        yield sink, f"127.0.0.1:{port}"
    finally:
        controller.stop()


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_an_alert_added_with_amtool_is_mailed_through_the_relay_with_its_login(
        smtp_sink, tmp_path):
    sink, smarthost = smtp_sink
    am_url, am = start_alertmanager(tmp_path, render_alertmanager(
        monitoring_alert_receiver="email", monitoring_alert_email_smarthost=smarthost,
        monitoring_alert_email_from="alertmanager@gpu-7.example.com",
        monitoring_alert_email_to="oncall@example.com",
        monitoring_alert_email_username=SMTP_USER, monitoring_alert_email_password=SMTP_PASSWORD,
        # the sink has no STARTTLS; Go's mail client still sends a password to 127.0.0.1
        monitoring_alert_email_require_tls=False, **FAST))
    try:
        amtool_alert_add(am_url, tmp_path, "alertname=AlertRoutingTest", "severity=critical",
                         "host=gpu-7", "model=tiny-sql", summary="routing test alert by mail")
        if not sink.got.wait(30):
            raise AssertionError(f"no mail arrived.\nalertmanager:\n{am.log()}")
        # the config Alertmanager shows (its UI, /api/v2/status) masks the password
        shown = httpx.get(f"{am_url}/api/v2/status", timeout=10).json()["config"]["original"]
    finally:
        am.stop()

    assert "smtp_auth_password: <secret>" in shown
    assert SMTP_PASSWORD not in shown and SMTP_PASSWORD not in am.log()

    mail = sink.messages[0]
    assert sink.logins == [(SMTP_USER.encode(), SMTP_PASSWORD.encode())]
    assert mail["To"] == "oncall@example.com"
    assert mail["From"] == "alertmanager@gpu-7.example.com"
    assert mail["Subject"] == "[FIRING] AlertRoutingTest gpu-7 tiny-sql"
    body = "".join(part.get_payload(decode=True).decode() for part in mail.walk()
                   if not part.is_multipart())
    assert "AlertRoutingTest" in body and "routing test alert by mail" in body


# ------------------------------------------------------------------ none, and inhibition


def test_receiver_none_keeps_alerts_in_alertmanager_and_inhibits_a_down_models_warnings(
        tmp_path):
    am_url, am = start_alertmanager(tmp_path, render_alertmanager(**FAST))

    def alert(name: str, severity: str, **labels: str) -> dict:
        return {"labels": {"alertname": name, "severity": severity, **labels},
                "annotations": {"summary": name}}

    try:
        r = httpx.post(f"{am_url}/api/v2/alerts", json=[
            alert("ModelBackendDown", "critical", host="gpu-1", model="tiny-sql"),
            alert("VLLMRequestsWaiting", "warning", host="gpu-1", model="tiny-sql"),
            alert("VLLMRequestsWaiting", "warning", host="gpu-1", model="sql-coder"),
            alert("VLLMRequestsWaiting", "warning", host="gpu-2", model="tiny-sql"),
            alert("GPUXidError", "critical", host="gpu-1", gpu="0"),
            alert("GPUTemperatureHigh", "warning", host="gpu-1", gpu="0"),
            alert("GPUTemperatureHigh", "warning", host="gpu-1", gpu="1"),
            alert("ModelsVolumeFilling", "warning", host="gpu-1"),
        ], timeout=10)
        assert r.status_code == 200, r.text

        def states() -> dict | None:
            alerts = httpx.get(f"{am_url}/api/v2/alerts", timeout=10).json()
            got = {(a["labels"]["alertname"], a["labels"].get("host"),
                    a["labels"].get("model") or a["labels"].get("gpu")): a["status"]["state"]
                   for a in alerts}
            # inhibition is worked out as alerts arrive: wait until all are placed
            return got if len(got) == 8 and "unprocessed" not in got.values() else None

        got = wait_until(states, timeout=15, what="all alerts processed")
        receivers = {rc["name"] for rc in httpx.get(f"{am_url}/api/v2/receivers").json()}
    finally:
        am.stop()

    assert receivers == {"none"}
    assert got == {
        ("ModelBackendDown", "gpu-1", "tiny-sql"): "active",
        # the same model on the same host: held back
        ("VLLMRequestsWaiting", "gpu-1", "tiny-sql"): "suppressed",
        # another model, or the same model on another host: still told
        ("VLLMRequestsWaiting", "gpu-1", "sql-coder"): "active",
        ("VLLMRequestsWaiting", "gpu-2", "tiny-sql"): "active",
        ("GPUXidError", "gpu-1", "0"): "active",
        ("GPUTemperatureHigh", "gpu-1", "0"): "suppressed",
        ("GPUTemperatureHigh", "gpu-1", "1"): "active",
        # no model label: a model's critical alert never holds it back
        ("ModelsVolumeFilling", "gpu-1", None): "active",
    }
