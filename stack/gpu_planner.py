"""GPU memory planner: which GPU each model runs on, and its --gpu-memory-utilization there,
computed from the models' architectures instead of guessed.

    python -m stack.gpu_planner [--gpu g5.xlarge|a10g|l4|...|<GiB>] [--models-dir DIR]

--gpu takes an EC2 instance type (the GPU kind and count follow from it), a GPU kind, or a size
in GiB; without it, the instance_type Terraform deploys (terraform.tfvars, TF_VAR_instance_type,
else g5.xlarge). Sizes are what the cards report (nvidia-smi's memory.total, the total vLLM
takes each share of), not the marketing figure: an A10G sold as 24 GB reports 23,028 MiB.

Placement (multi-GPU instance types, e.g. g5.12xlarge = 4 x A10G): each model runs on one GPU
(the vllm role sets CUDA_VISIBLE_DEVICES to its index). A model pinned in the declaration
(`gpu: N`) goes there; the others biggest need first, each on the GPU with the most room left,
so the models spread over the GPUs (more KV cache each). Then each GPU's models share it as
below.

vLLM's rules it follows:
- each instance's --gpu-memory-utilization is a share of the WHOLE GPU, and an instance refuses
  to start when free memory is below its share, so the shares must sum below 1;
- inside its share an instance holds its weights, its peak activations (profiled at start with
  max_num_batched_tokens), memory outside torch (CUDA context, cuBLAS/NCCL workspaces, CUDA
  graphs), and the KV cache gets the rest;
- the KV cache is handed out in blocks of 16 tokens; one token costs
  2 (K and V) x layers x KV heads x head_dim x bytes of the KV dtype.
The per-instance overheads below are estimates (marked); the KV arithmetic is exact, and is
checked against what real vLLM reports at start (tests/e2e).
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from stack import declaration

GIB = 1024**3
MIB = 1024**2


@dataclass(frozen=True)
class Gpu:
    name: str  # as nvidia-smi names it
    mib: int  # memory.total as nvidia-smi reports it, in MiB

    @property
    def gib(self) -> float:
        return self.mib / 1024


# memory.total reported by the driver (the figure vLLM sizes --gpu-memory-utilization from),
# each from an nvidia-smi output quoted in a public issue:
GPUS = {
    # g4dn: NVIDIA "16 GB"; 15360MiB on a g4dn.xlarge (zylon-ai/private-gpt#1173)
    "t4": Gpu("Tesla T4", 15360),
    # g5: "24 GB"; 23028MiB on an A10G, driver 535 (NVIDIA/DCGM#232)
    "a10g": Gpu("NVIDIA A10G", 23028),
    # g6: "24 GB"; 23034MiB (nvidia-smi totals listed in modal-labs/modal-client#2797)
    "l4": Gpu("NVIDIA L4", 23034),
    # g6e: "48 GB"; 46068 MiB, driver 595 (akash-network/provider-configs#99)
    "l40s": Gpu("NVIDIA L40S", 46068),
    # p4d: "40 GB"; 40960MiB on A100-SXM4-40GB, driver 580 (bottlerocket-core-kit#834)
    "a100-40": Gpu("NVIDIA A100-SXM4-40GB", 40960),
    # p4de (not deployable here): 81920MiB (modal-labs/modal-client#2797)
    "a100-80": Gpu("NVIDIA A100 80GB", 81920),
    # p5: "80 GB"; 81559MiB on H100 80GB HBM3, driver 550 (NVIDIA/nccl#1264)
    "h100": Gpu("NVIDIA H100 80GB HBM3", 81559),
}
GPUS_GIB = {k: g.gib for k, g in GPUS.items()}

# GPU kind and count of each EC2 instance type that terraform/variables.tf accepts
# (^(g4dn|g5|g6|g6e|p4d|p5)\.…), from AWS's accelerated-computing instance tables.
_ONE = {s: 1 for s in ("xlarge", "2xlarge", "4xlarge", "8xlarge", "16xlarge")}
INSTANCE_GPUS = {
    "g4dn": ("t4", {**_ONE, "12xlarge": 4, "metal": 8}),
    "g5": ("a10g", {**_ONE, "12xlarge": 4, "24xlarge": 4, "48xlarge": 8}),
    "g6": ("l4", {**_ONE, "12xlarge": 4, "24xlarge": 4, "48xlarge": 8}),
    "g6e": ("l40s", {**_ONE, "12xlarge": 4, "24xlarge": 4, "48xlarge": 8}),
    "p4d": ("a100-40", {"24xlarge": 8}),
    "p5": ("h100", {"48xlarge": 8}),
}
DEFAULT_INSTANCE_TYPE = "g5.xlarge"


def instance_gpus(instance_type: str) -> tuple[str, int]:
    """(GPU kind, GPUs per instance) of an EC2 instance type, e.g. g5.12xlarge -> (a10g, 4)."""
    family, _, size = instance_type.lower().partition(".")
    if family not in INSTANCE_GPUS:
        raise ValueError(
            f"instance type {instance_type!r}: no GPU known for family {family!r}; "
            f"use one of {', '.join(INSTANCE_GPUS)} (terraform/variables.tf allows these), "
            f"or pass --gpu <kind> (one of {', '.join(GPUS)}) or a size in GiB")
    kind, sizes = INSTANCE_GPUS[family]
    if size not in sizes:
        raise ValueError(
            f"instance type {instance_type!r}: {family} comes in "
            f"{', '.join(f'{family}.{s}' for s in sizes)}; fix instance_type, or pass --gpu "
            f"{kind}")
    return kind, sizes[size]


@dataclass(frozen=True)
class Target:
    """What the planner places the models on: `count` GPUs of `gib` each (each vLLM instance
    runs on one of them)."""

    label: str  # the heading of the plan
    gib: float
    count: int = 1
    name: str = ""  # what was asked for: an instance type, a GPU kind, a size

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8": 1, "F32": 4, "F16": 2,
               "BF16": 2, "F8_E4M3": 1, "I8": 1, "U8": 1, "I32": 4, "I64": 8, "BOOL": 1}
BLOCK_SIZE = 16
# Estimates per instance (not measured on an A10G here): CUDA context and library workspaces
# outside torch, and CUDA graph captures.
NON_TORCH_GIB = 0.6
CUDA_GRAPHS_GIB = 0.4
# vLLM's default chunked-prefill budget per step; activations scale with it
MAX_NUM_BATCHED_TOKENS = 8192
# the sum of shares stays under this: room for the driver, DCGM and fragmentation
DEFAULT_MARGIN = 0.92
# room kept per planned share, of the GPU, for rounding it to 3 decimals
ROUNDING = 0.001
CONFIGS = Path(__file__).resolve().parent / "model_configs"


class PlanError(Exception):
    """The models cannot share the GPU as declared; the message says what to lower."""


@dataclass(frozen=True)
class Architecture:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    dtype_bytes: int
    decoder: bool  # encoder-only (embedding) models keep no KV cache
    tied_embeddings: bool

    @classmethod
    def from_config(cls, cfg: dict) -> Architecture:
        heads = cfg["num_attention_heads"]
        arch = " ".join(cfg.get("architectures", []))
        return cls(
            layers=cfg["num_hidden_layers"], hidden=cfg["hidden_size"],
            intermediate=cfg.get("intermediate_size", 4 * cfg["hidden_size"]), heads=heads,
            kv_heads=cfg.get("num_key_value_heads", heads),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            vocab=cfg["vocab_size"],
            dtype_bytes=DTYPE_BYTES.get(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16",
                                        2),
            decoder="CausalLM" in arch or cfg.get("model_type") in ("qwen2", "llama", "mistral"),
            tied_embeddings=cfg.get("tie_word_embeddings", False),
        )

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes \
            if self.decoder else 0

    def estimated_params(self) -> int:
        attn = self.hidden * self.heads * self.head_dim * 2 \
            + self.hidden * self.kv_heads * self.head_dim * 2
        mlp = (3 if self.decoder else 2) * self.hidden * self.intermediate
        embed = self.vocab * self.hidden * (1 if self.tied_embeddings or not self.decoder else 2)
        return embed + self.layers * (attn + mlp + 4 * self.hidden)

    def activation_bytes(self, batched_tokens: int, max_num_seqs: int) -> int:
        """Peak of one forward pass: a layer's hidden/MLP tensors for the batch plus the
        float32 logits of the sampled rows (an estimate of what vLLM's profiling run sees)."""
        per_token = (4 * self.hidden + 2 * self.intermediate) * self.dtype_bytes
        logits = max_num_seqs * self.vocab * 4 if self.decoder else 0
        return batched_tokens * per_token + logits


def safetensors_bytes(model_dir: Path) -> int | None:
    """Weight bytes from the safetensors index or headers (no tensor is read)."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        total = json.loads(index.read_text()).get("metadata", {}).get("total_size")
        if total:
            return int(total)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, t in header.items():
            if name != "__metadata__":
                total += math.prod(t["shape"]) * DTYPE_BYTES.get(t["dtype"], 2)
    return total


@dataclass
class ModelPlan:
    name: str
    weights_gib: float
    overhead_gib: float
    kv_gib: float = 0.0
    fraction: float = 0.0
    kv_tokens: int = 0
    full_context_seqs: int = 0
    explicit: bool = False
    gpu: int = 0  # index on a multi-GPU instance (CUDA_VISIBLE_DEVICES)


def kv_tokens(arch: Architecture, kv_bytes: float) -> int:
    """Tokens a KV budget holds, in whole blocks (what vLLM reports as its KV cache size)."""
    if not arch.kv_bytes_per_token:
        return 0
    blocks = int(kv_bytes // (arch.kv_bytes_per_token * BLOCK_SIZE))
    return blocks * BLOCK_SIZE


def load_architecture(spec: declaration.ModelSpec, models_dir: Path | None) -> tuple:
    """(Architecture, weight bytes) from the downloaded model when present, else the bundled
    config of its hf_repo."""
    for d in ([models_dir / spec.name] if models_dir else []) + [CONFIGS / spec.hf_repo]:
        if (d / "config.json").exists():
            arch = Architecture.from_config(json.loads((d / "config.json").read_text()))
            weights = safetensors_bytes(d) or arch.estimated_params() * arch.dtype_bytes
            return arch, weights
    raise PlanError(f"no config.json for {spec.name} ({spec.hf_repo}): download the model or "
                    f"add {CONFIGS / spec.hf_repo / 'config.json'}")


def footprint(m: declaration.ModelSpec, arch: Architecture,
              weights: int) -> tuple[float, float, float, float]:
    """GiB of (weights, overheads, KV of one full-context sequence, KV of max_num_seqs of them):
    vLLM needs room for at least one sequence at full context; it wants all of them."""
    batched = max(MAX_NUM_BATCHED_TOKENS, m.max_model_len)
    overhead = (NON_TORCH_GIB + (CUDA_GRAPHS_GIB if arch.decoder else 0)
                + arch.activation_bytes(batched, m.max_num_seqs) / GIB)
    per_seq = math.ceil(m.max_model_len / BLOCK_SIZE) * BLOCK_SIZE * arch.kv_bytes_per_token
    return weights / GIB, overhead, per_seq / GIB, per_seq * m.max_num_seqs / GIB


def load_all(models: list[declaration.ModelSpec], models_dir: Path | None,
             architectures: dict | None = None) -> dict:
    return {m.name: (architectures or {}).get(m.name) or load_architecture(m, models_dir)
            for m in models}


def plan(models: list[declaration.ModelSpec], gpu_gib: float, models_dir: Path | None = None,
         margin: float = DEFAULT_MARGIN, architectures: dict | None = None) -> list[ModelPlan]:
    """The shares of models that run on one GPU."""
    budget = gpu_gib * margin
    loaded = load_all(models, models_dir, architectures)
    plans, want_kv = [], {}
    for m in models:
        weights_gib, overhead, one_seq, all_seqs = footprint(m, *loaded[m.name])
        p = ModelPlan(m.name, weights_gib, overhead)
        want_kv[m.name] = (one_seq, all_seqs)
        if m.gpu_memory_utilization is not None:
            p.fraction, p.explicit = m.gpu_memory_utilization, True
            p.kv_gib = max(0.0, p.fraction * gpu_gib - p.weights_gib - p.overhead_gib)
        plans.append(p)

    fixed = sum(p.weights_gib + p.overhead_gib for p in plans if not p.explicit)
    fixed += sum(p.fraction * gpu_gib for p in plans if p.explicit)
    auto = [p for p in plans if not p.explicit]
    free = budget - fixed - ROUNDING * gpu_gib * len(auto)  # room for rounding each share up
    need_min = sum(want_kv[p.name][0] for p in auto)
    if free < need_min - 1e-9:  # floating point: shares adding up to the margin fit
        short = need_min - free
        worst = max(auto or plans, key=lambda p: p.weights_gib + want_kv[p.name][0])
        raise PlanError(
            f"the models do not fit on a {gpu_gib:.4g} GiB GPU: {short:.2f} GiB short "
            f"(weights and overheads {fixed:.2f} GiB, one full-context sequence each "
            f"{need_min:.2f} GiB, usable {budget:.2f} GiB). Lower max_model_len or "
            f"max_num_seqs, use a smaller or quantized model (largest: {worst.name}, "
            f"{worst.weights_gib:.2f} GiB of weights), or move a model to another GPU.")
    want_full = sum(want_kv[p.name][1] for p in auto)
    for p in auto:
        lo, full = want_kv[p.name]
        if want_full <= free:
            share = full + (free - want_full) * (full / want_full if want_full else 1 / len(auto))
        else:  # everyone keeps one full sequence; the rest is shared by what each wants
            spare = free - need_min
            extra = full - lo
            share = lo + spare * (extra / (want_full - need_min) if want_full > need_min else 0)
        # 3 decimals: what the instance cannot do without rounds up, its KV share down
        p.fraction = (math.ceil((p.weights_gib + p.overhead_gib) / gpu_gib * 1000)
                      + math.floor(share / gpu_gib * 1000)) / 1000
        p.kv_gib = p.fraction * gpu_gib - p.weights_gib - p.overhead_gib
    for p, m in zip(plans, models, strict=True):
        arch = loaded[m.name][0]
        p.kv_tokens = kv_tokens(arch, p.kv_gib * GIB)
        p.full_context_seqs = min(m.max_num_seqs, p.kv_tokens // m.max_model_len) \
            if arch.decoder else m.max_num_seqs
        if arch.decoder and p.kv_tokens < m.max_model_len:
            raise PlanError(
                f"{m.name}: its share ({p.fraction}) leaves {p.kv_gib:.2f} GiB of KV cache, "
                f"less than one {m.max_model_len}-token sequence; raise gpu_memory_utilization "
                f"or lower max_model_len")
    if sum(p.fraction for p in plans) > margin + 1e-9:
        raise PlanError(f"the declared gpu_memory_utilization values sum to "
                        f"{sum(p.fraction for p in plans):.3f}, above {margin}: lower them")
    return plans


def need_gib(m: declaration.ModelSpec, loaded: dict, gpu_gib: float) -> float:
    """The least a model takes of one GPU: its declared share, else its weights, overheads,
    one full-context sequence and the rounding room plan() keeps (so whatever place() puts on
    a GPU, plan() fits on it)."""
    if m.gpu_memory_utilization is not None:
        return m.gpu_memory_utilization * gpu_gib
    weights, overhead, one_seq, _ = footprint(m, *loaded[m.name])
    return weights + overhead + one_seq + ROUNDING * gpu_gib


def _too_big(m: declaration.ModelSpec, need: float, loaded: dict, target: Target,
             margin: float) -> PlanError:
    usable = target.gib * margin
    if m.gpu_memory_utilization is not None:
        parts = f"its declared gpu_memory_utilization {m.gpu_memory_utilization}"
        fix = f"lower its gpu_memory_utilization to {margin} or less, or set it to null"
    else:
        weights, overhead, one_seq, _ = footprint(m, *loaded[m.name])
        parts = (f"weights {weights:.2f}, overheads {overhead:.2f}, one {m.max_model_len}-token "
                 f"sequence {one_seq:.2f}")
        fix = "lower its max_model_len or max_num_seqs, or use a smaller or quantized model"
        larger = sorted((g.gib, f"{family}.* ({g.name}, {g.gib:.4g} GiB)")
                        for family, (kind, _) in INSTANCE_GPUS.items()
                        if (g := GPUS[kind]).gib * margin >= need and g.gib > target.gib)
        if larger:
            fix += f", or deploy an instance type with larger GPUs: " \
                   f"{', '.join(text for _, text in larger)}"
    return PlanError(
        f"{m.name} fits on no single GPU: it needs {need:.2f} GiB ({parts}), and the largest "
        f"GPU here ({target.label}) has {usable:.2f} GiB usable ({margin} of it): "
        f"{need - usable:.2f} GiB short. Each model runs on one GPU: {fix}.")


def place(models: list[declaration.ModelSpec], target: Target, loaded: dict,
          margin: float = DEFAULT_MARGIN) -> dict[str, int]:
    """GPU index of each model: a pinned model (`gpu: N`) on its GPU, the others biggest need
    first, each on the GPU with the most room left (the lowest-numbered on a tie; ties in need
    keep the declaration's order). Spreading gives every model more KV cache than packing
    them onto the first GPU would, and idle GPUs are paid for anyway. On one GPU everything
    goes on GPU 0 and plan() says by how much the models miss it."""
    declaration.check_gpu_pins(models, target.count, target.name or "the target")
    usable = target.gib * margin + 1e-9  # shares that add up to the margin exactly fit
    need = {m.name: need_gib(m, loaded, target.gib) for m in models}
    for m in models:
        if need[m.name] > usable:
            raise _too_big(m, need[m.name], loaded, target, margin)
    used = [0.0] * target.count
    on: list[list[str]] = [[] for _ in range(target.count)]
    gpu_of: dict[str, int] = {}
    pinned = [m for m in models if m.gpu is not None]
    # biggest first: placed last, a big model can find every GPU part-filled by small ones
    rest = sorted((m for m in models if m.gpu is None), key=lambda m: -need[m.name])
    for m in pinned + rest:
        candidates = [m.gpu] if m.gpu is not None else range(target.count)
        fits = [i for i in candidates if used[i] + need[m.name] <= usable]
        gpu = min(fits, key=lambda i: (used[i], i)) if fits else None
        if gpu is None and target.count == 1:
            gpu = 0
        elif gpu is None:
            left = "; ".join(f"GPU {i}: {usable - used[i]:.2f} GiB left"
                             + (f" after {', '.join(on[i])}" if on[i] else "")
                             for i in candidates)
            where = (f"its pinned GPU {m.gpu}" if m.gpu is not None
                     else f"any of the {target.count} GPUs of {target.name or 'the target'}")
            raise PlanError(
                f"{m.name} needs {need[m.name]:.2f} GiB and {where} has no room for it ({left}"
                f"). " + ("Pin it to another GPU or drop its `gpu` to let the planner place "
                          "it; or lower" if m.gpu is not None else "Lower")
                + " max_model_len or max_num_seqs, declare fewer or smaller models, or deploy "
                  "an instance type with more or larger GPUs.")
        gpu_of[m.name] = gpu
        used[gpu] += need[m.name]
        on[gpu].append(m.name)
    return gpu_of


def plan_gpus(models: list[declaration.ModelSpec], target: Target,
              models_dir: Path | None = None, margin: float = DEFAULT_MARGIN,
              architectures: dict | None = None) -> list[ModelPlan]:
    """Each model's GPU (place()) and its share of that GPU (plan() of the GPU's models), in
    the declaration's order."""
    loaded = load_all(models, models_dir, architectures)
    gpu_of = place(models, target, loaded, margin)
    planned: dict[str, ModelPlan] = {}
    for gpu in sorted(set(gpu_of.values())):
        for p in plan([m for m in models if gpu_of[m.name] == gpu], target.gib, models_dir,
                      margin, loaded):
            p.gpu = gpu
            planned[p.name] = p
    return [planned[m.name] for m in models]


def table(plans: list[ModelPlan], gpu_gib: float) -> str:
    rows = [("MODEL", "WEIGHTS GiB", "OVERHEAD GiB", "KV GiB", "KV TOKENS", "SEQS@FULL CTX",
             "--gpu-memory-utilization")]
    for p in plans:
        rows.append((p.name, f"{p.weights_gib:.2f}", f"{p.overhead_gib:.2f}", f"{p.kv_gib:.2f}",
                     str(p.kv_tokens), str(p.full_context_seqs),
                     f"{p.fraction:.3f}" + (" (declared)" if p.explicit else "")))
    total = sum(p.fraction for p in plans)
    rows.append(("total", "", "", "", "", "", f"{total:.3f} of {gpu_gib:.4g} GiB"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


# a GPU kind or size stands for one GPU; the instance type carries the count
ONE_GPU = " (one GPU; name an instance type, e.g. g5.12xlarge, for its GPU count)"


def gpu_target(value: str) -> Target:
    """An EC2 instance type (g5.xlarge), a GPU kind (a10g) or a size in GiB (22.5)."""
    key = value.strip().lower()
    try:
        gib = float(key.removesuffix("gib"))
    except ValueError:
        pass
    else:
        if gib <= 0:
            raise argparse.ArgumentTypeError(f"GPU size {value!r}: must be above 0 GiB")
        return Target(f"{gib:g} GiB", gib, name=f"{gib:g} GiB{ONE_GPU}")
    if "." in key:
        try:
            kind, count = instance_gpus(key)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        g = GPUS[kind]
        return Target(f"{key}: {count} x {g.name}, {g.mib} MiB each", g.gib, count, key)
    if key in GPUS:
        g = GPUS[key]
        return Target(f"{g.name}, {g.mib} MiB", g.gib, name=f"{key}{ONE_GPU}")
    raise argparse.ArgumentTypeError(
        f"unknown GPU {value!r}: an EC2 instance type (g5.xlarge, g6.12xlarge ...), one of "
        f"{', '.join(GPUS)}, or a size in GiB")


def gpu_size(value: str) -> float:
    """GiB each GPU reports, for an instance type, a GPU kind or a number."""
    return gpu_target(value).gib


def default_gpu(tf_dir: Path | None = None) -> str:
    """The instance type Terraform deploys: terraform.tfvars, TF_VAR_instance_type, default."""
    from stack import aws_ops  # boto3 is only needed for the AWS verbs, not to read settings

    return aws_ops.setting("instance_type", DEFAULT_INSTANCE_TYPE,
                           tf_dir=tf_dir or aws_ops.TF_DIR)


def report(plans: list[ModelPlan], target: Target) -> str:
    """The plan as `make plan-gpu` prints it: one table on a single GPU, one per GPU in use on
    a multi-GPU instance."""
    if target.count == 1:
        return (f"GPU: {target.label}; shares are of one GPU's reported memory\n"
                + table(plans, target.gib))
    out = [f"GPU: {target.label}; each model runs on one GPU, its share is of that GPU's "
           "reported memory"]
    for gpu in range(target.count):
        mine = [p for p in plans if p.gpu == gpu]
        if mine:
            out += ["", f"GPU {gpu} (CUDA_VISIBLE_DEVICES={gpu})", table(mine, target.gib)]
    idle = [str(i) for i in range(target.count) if not any(p.gpu == i for p in plans)]
    if idle:
        out += ["", f"idle: GPU {', '.join(idle)} (no model runs there: fewer models than GPUs, "
                    "or the pins put them elsewhere)"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stack.gpu_planner",
                                 description="Place the declared models on the GPUs and size "
                                             "their shares.")
    ap.add_argument("--gpu", type=gpu_target,
                    help="EC2 instance type, GPU kind or size in GiB (default: the "
                         "instance_type Terraform deploys)")
    ap.add_argument("--models-dir", type=Path, help="downloaded models (<dir>/<name>)")
    ap.add_argument("--margin", type=float, default=DEFAULT_MARGIN)
    ap.add_argument("--json", action="store_true",
                    help='{name: {"gpu": index, "gpu_memory_utilization": share}}')
    ap.add_argument("--tf-dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.gpu is None:
        try:
            args.gpu = gpu_target(default_gpu(args.tf_dir))
        except argparse.ArgumentTypeError as e:
            ap.error(f"instance_type from the Terraform settings: {e}")
    try:
        plans = plan_gpus(declaration.load(), args.gpu, args.models_dir, args.margin)
    except (PlanError, declaration.DeclarationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({p.name: {"gpu": p.gpu, "gpu_memory_utilization": p.fraction}
                          for p in plans}))
    else:
        print(report(plans, args.gpu))
    return 0


if __name__ == "__main__":
    sys.exit(main())
