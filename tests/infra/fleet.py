"""Two GPU hosts behind a load balancer, on the systemd test hosts (tests/infra/test_site_fleet.py).

What `make deploy` with host_count 2 gives the hosts, with each AWS part replaced by a real one
on the controller's bridge address (the hosts' "VPC"); simulated_aws.yml's `fleet` section lists
every difference:
* ``Aws``: moto's server on the bridge address, the key set's S3 bucket and the cache's AUTH
  token in SSM (ElastiCache's token parameter) in it;
* ``shared_redis``: a real redis-server with TLS and a password on the bridge address, in the
  place of ElastiCache for Valkey; its CA is put in the hosts' trust store, as Amazon's is;
* ``inventory``: stack.aws_ops.inventory_document, the production mapping from Terraform's
  outputs to Ansible's variables, fed the test hosts' addresses;
* ``LoadBalancer``: a real nginx on loopback in the application load balancer's place, with a
  health checker playing the target group's: each host's /ready over HTTPS every second, two
  failures take it out, two successes put it back (nginx reloaded by its PID).
"""

from __future__ import annotations

import itertools
import signal
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from unittest.mock import patch

import boto3
import httpx

from stack import aws_ops
from tests.infra import hosts as testhosts
from tests.support.procs import Proc, free_port
from tests.support.redis_server import RedisServer

REGION = "us-east-1"
BUCKET = "llm-keys-fleet"
KEYS_OBJECT = f"s3://{BUCKET}/keys.json"
# what terraform/modules/key_store puts there first
EMPTY_KEY_SET = b'{"version":1,"keys":[]}\n'
TOKEN_PARAMETER = aws_ops.CACHE_TOKEN_PARAMETER.format(name="llm")
BRIDGE = testhosts.CONTROLLER_ADDR
# moto accepts any key; the hosts get these through gateway_aws_env, never real ones
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


class Aws:
    """moto's server where the hosts reach it: the controller's bridge address."""

    def __init__(self, folder: Path, python: str):
        self.port = free_port()
        self.endpoint = f"http://{BRIDGE}:{self.port}"
        self.proc = Proc("moto-fleet", [python, "-m", "moto.server", "-H", BRIDGE,
                                        "-p", str(self.port)], folder / "moto.log")
        self.proc.wait_http(f"{self.endpoint}/moto-api/", timeout=60)

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": REGION, **CREDENTIALS}

    def client(self, service: str):
        return boto3.session.Session().client(
            service, region_name=REGION, endpoint_url=self.endpoint,
            aws_access_key_id="testing", aws_secret_access_key="testing")

    def stop(self) -> None:
        self.proc.stop()


def shared_redis(folder: Path, tls: Path, password: str) -> RedisServer:
    return RedisServer(folder, tls=tls, password=password, host=BRIDGE, binds=(BRIDGE,)).start()


def trust_ca(host: testhosts.TestHost, ca_pem: str) -> None:
    """The host trusts the test CA system-wide, as an EC2 image trusts Amazon's."""
    host.ssh("cat > /usr/local/share/ca-certificates/llm-fleet-test-ca.crt && "
             "update-ca-certificates >/dev/null", check=True, input=ca_pem)


def inventory(names: dict[str, testhosts.TestHost], redis_port: int, ssh_key: Path,
              folder: Path) -> dict:
    """Terraform's outputs for two hosts, a key store and a cache, through the production
    mapping; the test hosts' addresses stand for both the public and the private ones. Grafana's
    password file is made in `folder`, as `make inventory` makes it in .local/."""
    dep = aws_ops.Deployment(
        name="llm", region=REGION, ssh_user="ubuntu", api_tls="acm",
        hosts=[aws_ops.Host(name=n, instance_id=f"i-0fleet{i:010d}", public_ip=h.address,
                            private_ip=h.address, instance_type="g5.xlarge")
               for i, (n, h) in enumerate(names.items())],
        key_store_url=KEYS_OBJECT, key_store_s3_cidrs=[f"{BRIDGE}/32"],
        vpc_cidr=str(testhosts.SUBNET), cache_endpoint=BRIDGE, cache_port=redis_port,
        cache_auth_token_ssm_parameter=TOKEN_PARAMETER, cache_subnet_cidrs=(f"{BRIDGE}/32",))
    with patch.object(aws_ops, "GRAFANA_PASSWORD", folder / "grafana-admin-password"):
        aws_ops.ensure_grafana_password()
        doc = aws_ops.inventory_document(dep, identity=str(ssh_key))
    # the test hosts' throwaway host keys, as every other infra test accepts them
    doc["all"]["children"]["gpu_hosts"]["vars"]["ansible_ssh_common_args"] = \
        "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"
    return doc


@dataclass
class LoadBalancer:
    """nginx on 127.0.0.1:port forwarding HTTPS to the hosts that pass the health check."""

    folder: Path
    targets: dict[str, str]  # host name -> address
    port: int = field(default_factory=free_port)
    healthy: dict[str, bool] = field(default_factory=dict)
    transitions: list[tuple[str, bool]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "tmp").mkdir(exist_ok=True)
        self.conf = self.folder / "nginx.conf"
        self.healthy = {n: True for n in self.targets}
        self._streak = {n: 0 for n in self.targets}
        self._stop = threading.Event()
        self._write()
        self.proc = Proc("lb-nginx", ["nginx", "-c", str(self.conf), "-g", "daemon off;"],
                         self.folder / "nginx.out")
        self.proc.wait_http(f"http://127.0.0.1:{self.port}/health", timeout=30)
        self._checker = threading.Thread(target=self._check_forever, daemon=True)
        self._checker.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _write(self) -> None:
        up = [a for n, a in self.targets.items() if self.healthy[n]]
        # a target group with no healthy target sends to all of them, as AWS's does
        servers = "".join(f"    server {a}:443;\n" for a in (up or self.targets.values()))
        tmp = self.folder / "tmp"
        self.conf.write_text(
            f"worker_processes 1;\npid {self.folder / 'nginx.pid'};\n"
            f"error_log {self.folder / 'error.log'} warn;\nevents {{ worker_connections 1024; }}\n"
            f"http {{\n  client_body_temp_path {tmp}/body;\n  proxy_temp_path {tmp}/proxy;\n"
            f"  access_log {self.folder / 'access.log'};\n"
            f"  upstream fleet {{\n{servers}    keepalive 32;\n  }}\n"
            f"  server {{\n    listen 127.0.0.1:{self.port};\n"
            "    location / {\n      proxy_pass https://fleet;\n"
            "      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n"
            "      proxy_set_header Host $host;\n"
            "      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n"
            # like the AWS load balancer: no retry on another target, no target certificate
            # check, streams passed on as they come
            "      proxy_next_upstream off;\n      proxy_ssl_verify off;\n"
            "      proxy_buffering off;\n      proxy_read_timeout 300s;\n    }\n  }\n}\n")

    def _probe(self, address: str) -> bool:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        try:
            return httpx.get(f"https://{address}/ready", verify=ctx, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def _check_forever(self) -> None:
        while not self._stop.wait(1.0):
            changed = False
            for name, address in self.targets.items():
                ok = self._probe(address)
                self._streak[name] = self._streak[name] + 1 if ok != self.healthy[name] else 0
                if self._streak[name] >= 2:
                    self.healthy[name], self._streak[name] = ok, 0
                    self.transitions.append((name, ok))
                    changed = True
            if changed:
                self._write()
                self.proc.signal(signal.SIGHUP)  # graceful: open requests finish on old workers

    def stop(self) -> None:
        self._stop.set()
        self._checker.join(timeout=5)
        self.proc.stop()


class Load:
    """Clients that keep `workers` requests open through the load balancer until stopped: a
    completion, a stream read to its end and, with `embed`, an embedding, over and over. A
    request fails when its status is not 200 or a stream ends without [DONE]."""

    def __init__(self, url: str, key: str, model: str, workers: int = 2,
                 embed: str | None = None, pause: float = 0.25):
        self.url, self.key = url, key
        self.requests = [("completions", {"model": model, "prompt": "SELECT", "max_tokens": 8,
                                          "stream": stream}) for stream in (False, True)]
        if embed:
            self.requests.append(("embeddings", {"model": embed, "input": "SELECT"}))
        # between a worker's requests: steady traffic that leaves this 2-core machine's CPU to
        # the engine restarting under it (back to back, a restart took over 10 minutes)
        self.pause = pause
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, args=(i,), daemon=True)
                         for i in range(workers)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)

    def _one(self, client: httpx.Client, path: str, body: dict) -> str | None:
        headers = {"authorization": f"Bearer {self.key}"}
        with client.stream("POST", f"{self.url}/v1/{path}", json=body, headers=headers) as r:
            text = r.read().decode(errors="replace")
        if r.status_code != 200:
            return f"{path} {r.status_code}: {text[:200]}"
        if body.get("stream") and "data: [DONE]" not in text:
            return f"stream cut: {text[-200:]!r}"
        return None

    def _work(self, offset: int) -> None:
        # a connection per request: nginx, reloaded when a host leaves or rejoins, closes its
        # idle keep-alive connections, and a request sent on one as it closes is lost without
        # an answer (seen once); AWS's load balancer changes targets without that race
        with httpx.Client(timeout=120, limits=httpx.Limits(max_keepalive_connections=0)) as client:
            for i in itertools.count(offset):
                if self._stop.wait(self.pause if i > offset else 0):
                    return
                try:
                    failure = self._one(client, *self.requests[i % len(self.requests)])
                except httpx.HTTPError as e:
                    failure = f"{type(e).__name__}: {e}"
                if failure:
                    self.failures.append(f"{time.strftime('%H:%M:%S')} {failure}")
                else:
                    self.ok += 1
