import json
import re
import struct
from pathlib import Path

import jinja2
import pytest
import yaml

from stack import declaration, gpu_planner
from stack.gpu_planner import GIB, Architecture, PlanError, kv_tokens, plan

ROOT = Path(__file__).resolve().parents[2]
# What an A10G reports (nvidia-smi memory.total: "23028MiB"), not the "24 GB" it is sold as
A10G_BYTES = 23028 * 1024 * 1024
A10G_GIB = A10G_BYTES / 2**30  # 22.488...

SEED = declaration.load()  # text2sql (Qwen2-1.5B), sqlcoder (DeepSeek-Coder-1.3B), embed


def spec(name, **over):
    base = next(m for m in SEED if m.name == name).model_dump()
    return declaration.ModelSpec(**{**base, **over})


def arch_of(name):
    return gpu_planner.load_architecture(spec(name), None)[0]


def test_kv_bytes_per_token_follow_the_architectures():
    # 2 (K,V) x layers x KV heads x head_dim x 2 bytes (bf16)
    assert arch_of("text2sql").kv_bytes_per_token == 2 * 28 * 2 * 128 * 2  # GQA: 28 KiB
    assert arch_of("sqlcoder").kv_bytes_per_token == 2 * 24 * 16 * 128 * 2  # MHA: 192 KiB
    assert arch_of("embed").kv_bytes_per_token == 0  # encoder-only: no KV cache


def test_weights_estimate_matches_the_published_sizes():
    # Qwen2-1.5B: 1.54 B parameters; DeepSeek-Coder-1.3B: 1.35 B
    assert 1.50e9 < arch_of("text2sql").estimated_params() < 1.58e9
    assert 1.30e9 < arch_of("sqlcoder").estimated_params() < 1.40e9


def test_kv_tokens_are_whole_blocks_of_16():
    a = arch_of("text2sql")
    assert kv_tokens(a, 1 * GIB) == (GIB // (28672 * 16)) * 16 == 37440


def test_seed_models_fit_an_a10g_under_the_margin():
    plans = plan(SEED, A10G_GIB)
    by = {p.name: p for p in plans}
    assert sum(p.fraction for p in plans) <= gpu_planner.DEFAULT_MARGIN
    for m in SEED:
        p = by[m.name]
        # each share holds its weights, its overheads and its KV cache
        assert p.fraction * A10G_GIB >= p.weights_gib + p.overhead_gib + p.kv_gib - 1e-9
        if m.task == "generate":
            assert p.full_context_seqs >= 1 and p.kv_tokens >= m.max_model_len
    # the MHA model needs 7x the KV memory per token of the GQA one for the same concurrency
    assert by["sqlcoder"].kv_gib > 5 * by["text2sql"].kv_gib
    assert abs(by["sqlcoder"].full_context_seqs - by["text2sql"].full_context_seqs) <= 1


def test_a_declared_share_wins_and_the_rest_is_planned_around_it():
    models = [spec("text2sql", gpu_memory_utilization=0.5), spec("sqlcoder"), spec("embed")]
    by = {p.name: p for p in plan(models, A10G_GIB)}
    assert by["text2sql"].fraction == 0.5 and by["text2sql"].explicit
    assert sum(p.fraction for p in by.values()) <= gpu_planner.DEFAULT_MARGIN


def test_refusal_names_the_shortfall_and_what_to_lower():
    with pytest.raises(PlanError, match=r"8 GiB GPU: \d+\.\d\d GiB short.*Lower max_model_len"):
        plan(SEED, 8.0)


def test_declared_shares_that_overcommit_are_refused():
    models = [spec("text2sql", gpu_memory_utilization=0.6),
              spec("sqlcoder", gpu_memory_utilization=0.5), spec("embed")]
    with pytest.raises(PlanError):
        plan(models, 24.0)


def test_a_share_too_small_for_one_sequence_is_refused():
    with pytest.raises(PlanError, match="text2sql.*less than one 4096-token sequence"):
        plan([spec("text2sql", gpu_memory_utilization=0.17)], 24.0)


def test_weights_come_from_safetensors_headers(tmp_path):
    header = {"a": {"dtype": "BF16", "shape": [1000, 64], "data_offsets": [0, 128000]},
              "b": {"dtype": "F32", "shape": [10], "data_offsets": [128000, 128040]},
              "__metadata__": {"format": "pt"}}
    raw = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    assert gpu_planner.safetensors_bytes(tmp_path) == 1000 * 64 * 2 + 10 * 4
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {"total_size": 7}}')
    assert gpu_planner.safetensors_bytes(tmp_path) == 7


def test_gpu_sizes_are_what_the_cards_report_not_the_marketing_figure():
    # nvidia-smi memory.total, MiB: A10G 23028, L4 23034, T4 15360, L40S 46068,
    # A100-SXM4-40GB 40960, H100 80GB HBM3 81559
    reported_mib = {"a10g": 23028, "l4": 23034, "t4": 15360, "l40s": 46068,
                    "a100-40": 40960, "h100": 81559}
    for kind, mib in reported_mib.items():
        assert gpu_planner.gpu_size(kind) * GIB == mib * 2**20, kind
    assert gpu_planner.gpu_size("A10G") * GIB == A10G_BYTES
    assert round(gpu_planner.gpu_size("a10g"), 2) == 22.49
    assert gpu_planner.gpu_size("48") == 48 and gpu_planner.gpu_size("22.5GiB") == 22.5
    with pytest.raises(Exception, match="unknown GPU"):
        gpu_planner.gpu_size("v100x")


def test_planned_kv_cache_is_what_vllm_gets_from_the_reported_size():
    # a declared share of 0.5 on a g5.xlarge: vLLM gives the instance 0.5 x 23028 MiB, and
    # the KV cache is what is left after weights and overheads, in blocks of 16 tokens of
    # 2 x 28 layers x 2 KV heads x 128 x 2 bytes (Qwen2-1.5B, bf16)
    p = plan([spec("text2sql", gpu_memory_utilization=0.5)],
             gpu_planner.gpu_size("g5.xlarge"))[0]
    kv_budget = 0.5 * A10G_BYTES - (p.weights_gib + p.overhead_gib) * 2**30
    block = 16 * (2 * 28 * 2 * 128 * 2)
    assert p.kv_tokens == int(kv_budget // block) * 16
    # sized from "24 GiB" it would promise about 27,000 tokens vLLM never allocates
    assert p.kv_tokens < int((0.5 * 24 * 2**30 - (p.weights_gib + p.overhead_gib) * 2**30)
                             // block) * 16 - 25000


@pytest.mark.parametrize(("instance_type", "kind", "count"), [
    # AWS's accelerated-computing tables: GPUs per instance
    ("g4dn.xlarge", "t4", 1), ("g4dn.12xlarge", "t4", 4), ("g4dn.metal", "t4", 8),
    ("g5.xlarge", "a10g", 1), ("g5.16xlarge", "a10g", 1), ("g5.12xlarge", "a10g", 4),
    ("g5.24xlarge", "a10g", 4), ("g5.48xlarge", "a10g", 8),
    ("g6.2xlarge", "l4", 1), ("g6.12xlarge", "l4", 4), ("g6.48xlarge", "l4", 8),
    ("g6e.xlarge", "l40s", 1), ("g6e.24xlarge", "l40s", 4), ("g6e.48xlarge", "l40s", 8),
    ("p4d.24xlarge", "a100-40", 8), ("p5.48xlarge", "h100", 8),
])
def test_instance_type_names_the_gpu_kind_and_count(instance_type, kind, count):
    assert gpu_planner.instance_gpus(instance_type) == (kind, count)
    target = gpu_planner.gpu_target(instance_type)
    assert target.count == count and target.gib == gpu_planner.gpu_size(kind)


def test_every_family_terraform_allows_has_a_gpu():
    variables = (ROOT / "terraform" / "variables.tf").read_text()
    allowed = re.search(r'regex\("\^\(([a-z0-9|]+)\)', variables).group(1).split("|")
    assert set(allowed) == set(gpu_planner.INSTANCE_GPUS)


def test_unknown_instance_types_are_refused_with_what_to_do():
    with pytest.raises(ValueError, match=r"g5 comes in g5\.xlarge.*or pass --gpu a10g"):
        gpu_planner.instance_gpus("g5.3xlarge")
    with pytest.raises(ValueError, match=r"no GPU known for family 'p3'.*g4dn, g5"):
        gpu_planner.instance_gpus("p3.2xlarge")


def test_cli_defaults_to_the_instance_type_terraform_deploys(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TF_VAR_instance_type", raising=False)
    (tmp_path / "terraform.tfvars").write_text('instance_type = "g6.12xlarge"\n')
    assert gpu_planner.main(["--tf-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "g6.12xlarge: 4 x NVIDIA L4, 23034 MiB each" in out
    assert "idle: GPU 3" in out  # the three seed models get one L4 each
    (tmp_path / "terraform.tfvars").unlink()
    monkeypatch.setenv("TF_VAR_instance_type", "g4dn.xlarge")
    assert gpu_planner.main(["--tf-dir", str(tmp_path), "--json"]) == 0
    t4 = json.loads(capsys.readouterr().out)
    assert gpu_planner.main(["--gpu", "15", "--json"]) == 0
    assert t4 == json.loads(capsys.readouterr().out)  # 15360 MiB is 15 GiB
    monkeypatch.setenv("TF_VAR_instance_type", "g5.3xlarge")
    with pytest.raises(SystemExit):
        gpu_planner.main(["--tf-dir", str(tmp_path)])
    assert "instance_type from the Terraform settings" in capsys.readouterr().err


def test_the_vllm_role_plans_for_the_inventory_instance_type(capsys):
    """group_vars hands the planner the host's aws_instance_type (the role runs
    `stack.gpu_planner --json --gpu {{ vllm_gpu_kind }}`)."""
    group_vars = yaml.safe_load((ROOT / "ansible/group_vars/all/main.yml").read_text())
    configure = (ROOT / "ansible/roles/vllm/tasks/configure.yml").read_text()
    assert "--gpu {{ vllm_gpu_kind }}" in configure
    kind = jinja2.Environment().from_string(group_vars["vllm_gpu_kind"])
    assert kind.render(aws_instance_type="g6e.12xlarge") == "g6e.12xlarge"
    assert kind.render() == "a10g"  # static inventories without the instance type
    assert gpu_planner.main(["--json", "--gpu", kind.render(aws_instance_type="g6e.12xlarge")]) \
        == 0
    l40s = json.loads(capsys.readouterr().out)
    # four L40S: one model on each of three, each given its whole usable share
    assert sorted(s["gpu"] for s in l40s.values()) == [0, 1, 2]
    assert all(s["gpu_memory_utilization"] == pytest.approx(0.92, abs=0.002)
               for s in l40s.values())


def test_cli_prints_the_table_and_json(capsys):
    assert gpu_planner.main(["--gpu", "a10g"]) == 0
    out = capsys.readouterr().out
    assert "--gpu-memory-utilization" in out and "text2sql" in out
    assert gpu_planner.main(["--json"]) == 0
    shares = json.loads(capsys.readouterr().out)
    assert set(shares) == {m.name for m in SEED}
    assert gpu_planner.main(["--gpu", "4"]) == 1
    assert "GiB short" in capsys.readouterr().err


def test_local_tiny_architecture_kv(tmp_path):
    # the local stand-ins: hidden 128, 2 heads (head_dim 64), 1 KV head, float32
    a = Architecture.from_config({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                                  "hidden_size": 128, "num_attention_heads": 2,
                                  "num_key_value_heads": 1, "num_hidden_layers": 4,
                                  "vocab_size": 4096, "torch_dtype": "float32"})
    assert a.kv_bytes_per_token == 2 * 4 * 1 * 64 * 4


# --- placement on multi-GPU instance types (each model on one GPU) ----------------------------

# `make plan-gpu GPU=g5.xlarge` before placement existed, character for character
G5_XLARGE_PLAN = """\
GPU: g5.xlarge: 1 x NVIDIA A10G, 23028 MiB each; shares are of one GPU's reported memory
MODEL     WEIGHTS GiB  OVERHEAD GiB  KV GiB  KV TOKENS  SEQS@FULL CTX  --gpu-memory-utilization
text2sql  2.88         1.39          1.50    56032      13             0.256
sqlcoder  2.51         1.30          10.25   55968      13             0.625
embed     0.08         0.74          0.01    0          64             0.037
total                                                                  0.918 of 22.49 GiB
"""


def copies(shares: dict[str, float], **over) -> list[declaration.ModelSpec]:
    """text2sql under other names, each with a declared share (so its need is exact)."""
    base = spec("text2sql")
    return [base.model_copy(update={"name": name, "port": 9000 + i,
                                    "gpu_memory_utilization": share, **over})
            for i, (name, share) in enumerate(shares.items())]


def placed(models, target) -> dict[str, int]:
    return {p.name: p.gpu for p in gpu_planner.plan_gpus(models, target)}


def test_single_gpu_output_is_unchanged_for_g5_xlarge(capsys):
    assert gpu_planner.main(["--gpu", "g5.xlarge"]) == 0
    assert capsys.readouterr().out == G5_XLARGE_PLAN
    assert gpu_planner.main(["--gpu", "g5.xlarge", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "text2sql": {"gpu": 0, "gpu_memory_utilization": 0.256},
        "sqlcoder": {"gpu": 0, "gpu_memory_utilization": 0.625},
        "embed": {"gpu": 0, "gpu_memory_utilization": 0.037}}


def test_on_one_gpu_placement_changes_nothing_of_the_plan():
    target = gpu_planner.gpu_target("g5.xlarge")
    assert gpu_planner.plan_gpus(SEED, target) == plan(SEED, target.gib)


def test_largest_first_fits_what_declaration_order_would_not():
    # 2 GPUs, 0.92 of each usable. In declaration order first-fit puts both small models on
    # GPU 0 (0.5), the first big one on GPU 1 (0.6), and finds no room for the second big one.
    # Biggest first: one big and one small model per GPU (0.85 each).
    models = copies({"small-a": 0.25, "small-b": 0.25, "big-c": 0.6, "big-d": 0.6})
    two = gpu_planner.Target("2 x A10G", A10G_GIB, count=2, name="2 x A10G")
    assert placed(models, two) == {"big-c": 0, "big-d": 1, "small-a": 0, "small-b": 1}
    for gpu in (0, 1):
        plans = [p for p in gpu_planner.plan_gpus(models, two) if p.gpu == gpu]
        assert sum(p.fraction for p in plans) == pytest.approx(0.85)


def test_placement_is_deterministic_and_spreads_over_the_gpus_with_the_most_room():
    # equal needs keep the declaration's order, each on the emptiest GPU (lowest on a tie)
    models = copies({"a": 0.3, "b": 0.3, "c": 0.3, "d": 0.3, "e": 0.3, "f": 0.3})
    target = gpu_planner.gpu_target("g5.12xlarge")
    assert placed(models, target) == {"a": 0, "b": 1, "c": 2, "d": 3, "e": 0, "f": 1}
    assert placed(list(reversed(models)), target) == {"f": 0, "e": 1, "d": 2, "c": 3, "b": 0,
                                                      "a": 1}
    assert sorted(placed(SEED, target).values()) == [0, 1, 2]


def test_a_pinned_model_runs_on_its_gpu_and_the_others_are_planned_around_it():
    models = [spec("text2sql"), spec("sqlcoder", gpu=2), spec("embed")]
    target = gpu_planner.gpu_target("g5.12xlarge")
    plans = {p.name: p for p in gpu_planner.plan_gpus(models, target)}
    # the pinned one first; then the bigger need on the emptiest GPU, the lowest on a tie
    assert {n: p.gpu for n, p in plans.items()} == {"text2sql": 0, "sqlcoder": 2, "embed": 1}
    # alone on its GPU, sqlcoder gets the whole usable share: far more KV cache than shared
    assert plans["sqlcoder"].fraction == pytest.approx(0.92, abs=0.002)
    assert plans["sqlcoder"].kv_gib > 1.5 * plan(SEED, target.gib)[1].kv_gib


def test_pinned_models_go_first_even_when_smaller():
    # unpinned, big-a would take GPU 0; the small model pinned there keeps it
    models = copies({"big-a": 0.8, "small-b": 0.3})
    models[1] = models[1].model_copy(update={"gpu": 0})
    assert placed(models, gpu_planner.gpu_target("g6.12xlarge")) == {"big-a": 1, "small-b": 0}


def test_a_pin_beyond_the_instance_types_gpus_is_refused():
    models = [spec("text2sql", gpu=4), spec("sqlcoder"), spec("embed")]
    with pytest.raises(declaration.DeclarationError,
                       match=r"pins text2sql \(gpu: 4\), but g5\.12xlarge has 4 GPUs \(0-3\)"):
        gpu_planner.plan_gpus(models, gpu_planner.gpu_target("g5.12xlarge"))
    with pytest.raises(declaration.DeclarationError, match=r"g5\.xlarge has 1 GPU \(0\)"):
        gpu_planner.plan_gpus([spec("text2sql", gpu=1)], gpu_planner.gpu_target("g5.xlarge"))
    # the vllm role's fallback without the inventory's instance type is one A10G
    with pytest.raises(declaration.DeclarationError,
                       match=r"but a10g \(one GPU; name an instance type, e\.g\. g5\.12xlarge, "
                             r"for its GPU count\) has 1 GPU \(0\)"):
        gpu_planner.plan_gpus([spec("text2sql", gpu=1)], gpu_planner.gpu_target("a10g"))


def test_the_schema_refuses_a_negative_gpu():
    with pytest.raises(ValueError, match="gpu"):
        spec("text2sql", gpu=-1)


def test_a_model_no_single_gpu_holds_is_refused_with_what_to_lower():
    # one 65536-token sequence of the MHA sqlcoder is 12 GiB of KV cache: no T4 holds it
    big = spec("sqlcoder", max_model_len=65536)
    with pytest.raises(PlanError) as e:
        gpu_planner.plan_gpus([spec("text2sql"), big], gpu_planner.gpu_target("g4dn.12xlarge"))
    message = str(e.value)
    assert re.search(r"^sqlcoder fits on no single GPU: it needs \d+\.\d\d GiB", message)
    assert "one 65536-token sequence 12.00" in message
    assert "largest GPU here (g4dn.12xlarge: 4 x Tesla T4, 15360 MiB each) has 13.80 GiB" in message
    assert "lower its max_model_len or max_num_seqs" in message
    # instance types whose GPU would hold it, smallest first; never the T4 itself
    assert message.endswith(
        "larger GPUs: g5.* (NVIDIA A10G, 22.49 GiB), g6.* (NVIDIA L4, 22.49 GiB), "
        "p4d.* (NVIDIA A100-SXM4-40GB, 40 GiB), g6e.* (NVIDIA L40S, 44.99 GiB), "
        "p5.* (NVIDIA H100 80GB HBM3, 79.65 GiB).")
    assert "tensor" not in message  # not implemented, so never suggested


def test_a_declared_share_above_the_margin_is_refused_with_what_to_lower():
    with pytest.raises(PlanError, match=r"^text2sql fits on no single GPU.*declared "
                                        r"gpu_memory_utilization 0\.95.*lower its "
                                        r"gpu_memory_utilization to 0\.92 or less"):
        gpu_planner.plan_gpus(copies({"text2sql": 0.95}), gpu_planner.gpu_target("g5.12xlarge"))


def test_models_that_fit_no_gpu_left_are_refused_naming_each_gpus_room():
    models = copies({f"m{i}": 0.6 for i in range(5)})
    with pytest.raises(PlanError, match=r"^m4 needs 13\.49 GiB and any of the 4 GPUs of "
                                        r"g5\.12xlarge has no room for it \(GPU 0: 7\.20 GiB "
                                        r"left after m0; .*GPU 3: 7\.20 GiB left after m3\)"):
        gpu_planner.plan_gpus(models, gpu_planner.gpu_target("g5.12xlarge"))


def test_a_pinned_model_without_room_on_its_gpu_is_refused():
    models = copies({"a": 0.6, "b": 0.6})
    models = [m.model_copy(update={"gpu": 1}) for m in models]
    with pytest.raises(PlanError, match=r"^b needs 13\.49 GiB and its pinned GPU 1 has no "
                                        r"room for it \(GPU 1: 7\.20 GiB left after a\)\. Pin "
                                        r"it to another GPU"):
        gpu_planner.plan_gpus(models, gpu_planner.gpu_target("g5.12xlarge"))


def test_cli_prints_each_gpus_models_and_shares_of_that_gpu(capsys, monkeypatch):
    models = [spec("text2sql"), spec("sqlcoder", gpu=1), spec("embed")]
    monkeypatch.setattr(declaration, "load", lambda *a, **k: models)
    assert gpu_planner.main(["--gpu", "g5.12xlarge"]) == 0
    out = capsys.readouterr().out
    gpu0, rest = out.split("GPU 0 (CUDA_VISIBLE_DEVICES=0)\n")[1].split(
        "GPU 1 (CUDA_VISIBLE_DEVICES=1)\n")
    gpu1, gpu2 = rest.split("GPU 2 (CUDA_VISIBLE_DEVICES=2)\n")
    assert "text2sql" in gpu0 and "embed" not in gpu0 and "sqlcoder" not in gpu0
    assert "sqlcoder" in gpu1 and "text2sql" not in gpu1
    assert "embed" in gpu2
    assert re.search(r"total +0\.9\d\d of 22\.49 GiB", gpu1)
    assert "idle: GPU 3" in out
    assert gpu_planner.main(["--gpu", "g5.12xlarge", "--json"]) == 0
    shares = json.loads(capsys.readouterr().out)
    assert {n: s["gpu"] for n, s in shares.items()} == {"text2sql": 0, "sqlcoder": 1, "embed": 2}


def test_declared_shares_that_fill_a_gpu_exactly_share_it():
    # 0.81 + 0.11 is the margin itself; in floating point, of an H100's 79.65 GiB, a hair over
    models = [m.model_copy(update={"gpu": 0}) for m in copies({"a": 0.81, "b": 0.11})]
    assert placed(models, gpu_planner.gpu_target("p5.48xlarge")) == {"a": 0, "b": 0}
