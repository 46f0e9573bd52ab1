import json
import struct

import pytest

from stack import declaration, gpu_planner
from stack.gpu_planner import GIB, Architecture, PlanError, kv_tokens, plan

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
    plans = plan(SEED, 24.0)
    by = {p.name: p for p in plans}
    assert sum(p.fraction for p in plans) <= gpu_planner.DEFAULT_MARGIN
    for m in SEED:
        p = by[m.name]
        # each share holds its weights, its overheads and its KV cache
        assert p.fraction * 24 >= p.weights_gib + p.overhead_gib + p.kv_gib - 1e-9
        if m.task == "generate":
            assert p.full_context_seqs >= 1 and p.kv_tokens >= m.max_model_len
    # the MHA model needs 7x the KV memory per token of the GQA one for the same concurrency
    assert by["sqlcoder"].kv_gib > 5 * by["text2sql"].kv_gib
    assert abs(by["sqlcoder"].full_context_seqs - by["text2sql"].full_context_seqs) <= 1


def test_a_declared_share_wins_and_the_rest_is_planned_around_it():
    models = [spec("text2sql", gpu_memory_utilization=0.5), spec("sqlcoder"), spec("embed")]
    by = {p.name: p for p in plan(models, 24.0)}
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


def test_gpu_sizes_by_name_or_number():
    assert gpu_planner.gpu_size("A10G") == 24 and gpu_planner.gpu_size("h100") == 80
    assert gpu_planner.gpu_size("48") == 48
    with pytest.raises(Exception, match="unknown GPU"):
        gpu_planner.gpu_size("v100x")


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
