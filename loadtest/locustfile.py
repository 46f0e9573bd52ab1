"""Realistic text-to-SQL traffic against the API's front door.

The mix comes from the model declaration (each model's load_weight): streaming chat and
completions (time to first token and inter-token latency get their own locust entries),
non-streaming chat, and embeddings where an embeddings model is declared. Prompts come from
loadtest/prompts.jsonl. Settings come from the environment:

  LLM_API_KEY      the API key (required)
  LLM_CA_BUNDLE    CA file to verify the server with (the local stack's CA, for example)
  LLM_MAX_TOKENS   completion length asked for (default 64)
  LOADTEST_SAMPLES where to write one JSON line per request for the report (default: none)

`make loadtest` runs this headless and then loadtest/report.py; see the README.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

from locust import HttpUser, between, events

from stack import declaration

PROMPTS = [json.loads(line) for line in
           Path(__file__).with_name("prompts.jsonl").read_text().splitlines() if line]
MODELS = declaration.load()
MAX_TOKENS = int(os.environ.get("LLM_MAX_TOKENS", "64"))
SYSTEM = "Translate the question into one SQL query over the shop schema. Answer with SQL only."

_samples: list[dict] = []


def _record(**sample) -> None:
    _samples.append(sample)


@events.quitting.add_listener
def _write_samples(environment, **_kw) -> None:
    path = os.environ.get("LOADTEST_SAMPLES")
    if path:
        # one file per locust process, so distributed workers never write the same file
        out = Path(path).with_name(f"{Path(path).stem}-{os.getpid()}{Path(path).suffix}")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(s) + "\n" for s in _samples))


class ApiUser(HttpUser):
    wait_time = between(0.05, 0.5)

    def on_start(self) -> None:
        key = os.environ.get("LLM_API_KEY")
        if not key:
            raise SystemExit("set LLM_API_KEY to an API key (make local prints one)")
        self.client.headers["Authorization"] = f"Bearer {key}"
        if os.environ.get("LLM_CA_BUNDLE"):
            self.client.verify = os.environ["LLM_CA_BUNDLE"]

    def _fire(self, kind: str, name: str, ms: float) -> None:
        self.environment.events.request.fire(
            request_type=kind, name=name, response_time=ms, response_length=0,
            exception=None, context={})

    def _stream(self, model: str, path: str, body: dict, label: str) -> None:
        body = {**body, "model": model, "max_tokens": MAX_TOKENS, "stream": True,
                "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        first = last = None
        gaps: list[float] = []
        usage: dict = {}
        with self.client.post(path, json=body, stream=True, catch_response=True,
                              name=f"{label} {model}") as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}")
                _record(model=model, kind=label, status=r.status_code, ok=False)
                return
            for line in r.iter_lines():
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if not chunk.get("choices"):
                    continue
                now = time.perf_counter()
                if first is None:
                    first = now
                    self._fire("TTFT", f"{label} {model}", (now - start) * 1000)
                else:
                    gaps.append((now - last) * 1000)
                    self._fire("ITL", f"{label} {model}", gaps[-1])
                last = now
            r.success()
        end = time.perf_counter()
        out = usage.get("completion_tokens", 0)
        _record(model=model, kind=label, status=200, ok=first is not None,
                ttft_ms=(first - start) * 1000 if first else None,
                tpot_ms=((end - first) * 1000 / (out - 1)) if first and out > 1 else 0.0,
                itl_ms=gaps, e2e_ms=(end - start) * 1000,
                prompt_tokens=usage.get("prompt_tokens", 0), completion_tokens=out)

    def _plain(self, model: str, path: str, body: dict, label: str) -> None:
        start = time.perf_counter()
        with self.client.post(path, json={**body, "model": model}, catch_response=True,
                              name=f"{label} {model}") as r:
            e2e = (time.perf_counter() - start) * 1000
            if r.status_code != 200:
                r.failure(f"{r.status_code}")
                _record(model=model, kind=label, status=r.status_code, ok=False)
                return
            usage = r.json().get("usage") or {}
            r.success()
        _record(model=model, kind=label, status=200, ok=True, ttft_ms=e2e, tpot_ms=0.0,
                itl_ms=[], e2e_ms=e2e, prompt_tokens=usage.get("prompt_tokens", 0),
                completion_tokens=usage.get("completion_tokens", 0))


def _messages(q: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]


def _tasks_for(model: declaration.ModelSpec) -> dict:
    """Task functions for one model, weighted by its load_weight."""
    name = model.name
    if model.task == "embed":
        def embed(user: ApiUser) -> None:
            batch = [p["question"] for p in random.sample(PROMPTS, 4)]
            user._plain(name, "/v1/embeddings", {"input": batch}, "embeddings")
        return {embed: 2 * model.load_weight}

    def chat_stream(user: ApiUser) -> None:
        user._stream(name, "/v1/chat/completions",
                     {"messages": _messages(random.choice(PROMPTS)["question"])}, "chat-stream")

    def completion_stream(user: ApiUser) -> None:
        q = random.choice(PROMPTS)["question"]
        user._stream(name, "/v1/completions", {"prompt": f"-- {q}\nSELECT"}, "completion-stream")

    def chat(user: ApiUser) -> None:
        user._plain(name, "/v1/chat/completions",
                    {"messages": _messages(random.choice(PROMPTS)["question"]),
                     "max_tokens": MAX_TOKENS}, "chat")

    w = model.load_weight
    return {chat_stream: 3 * w, completion_stream: w, chat: 2 * w}


ApiUser.tasks = {fn: weight for m in MODELS if m.load_weight for fn, weight in
                 _tasks_for(m).items()}
