"""The one model declaration (ansible/group_vars/all/models.yml), loaded and checked.

Ansible reads the same file as plain group_vars; this module is how Python (local mode, the
GPU planner, the load test) reads it, with the checks Ansible's argument specs also make.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ROOT = Path(__file__).resolve().parent.parent
DECLARATION = ROOT / "ansible" / "group_vars" / "all" / "models.yml"


class LocalStandIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["tiny-qwen2", "package"]
    seed: int | None = None
    package: str | None = None
    # the CPU engine's dtype: bf16 is 3x faster for the tiny decoders here; the embedding
    # model warns about every weight cast in bf16 and is no faster, so it stays float32
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,40}$")
    hf_repo: str = Field(pattern=r"^[\w.-]+/[\w.-]+$")
    revision: str
    task: Literal["generate", "embed"] = "generate"
    port: int = Field(ge=1024, le=65535)
    gpu_memory_utilization: float | None = Field(default=None, gt=0, lt=1)
    # pin to this GPU of a multi-GPU instance (CUDA index); None: the planner places it
    gpu: int | None = Field(default=None, ge=0)
    max_model_len: int = Field(gt=0)
    max_num_seqs: int = Field(gt=0)
    max_tokens: int = Field(gt=0)
    max_concurrency: int = Field(gt=0)
    timeout_s: float = Field(gt=0)
    load_weight: int = Field(default=1, ge=0)
    local: LocalStandIn

    @field_validator("revision")
    @classmethod
    def _pinned(cls, v: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{40}", v):
            raise ValueError("pin a 40-character commit hash, not a branch or tag")
        return v


class Declaration(BaseModel):
    model_config = ConfigDict(extra="allow")  # other group_vars may live beside it
    llm_models: list[ModelSpec] = Field(min_length=1)

    @field_validator("llm_models")
    @classmethod
    def _unique(cls, models: list[ModelSpec]) -> list[ModelSpec]:
        for attr in ("name", "port"):
            values = [getattr(m, attr) for m in models]
            dupes = {v for v in values if values.count(v) > 1}
            if dupes:
                raise ValueError(f"duplicate {attr}: {sorted(dupes)}")
        return models


class DeclarationError(Exception):
    pass


def check_gpu_pins(models: list[ModelSpec], count: int, where: str) -> None:
    """A model pinned with `gpu: N` needs an instance with more than N GPUs; `where` names the
    instance type (or GPU) the count comes from. Only the planner knows the count, so it calls
    this; the field itself is checked by the schema above."""
    bad = [m for m in models if m.gpu is not None and m.gpu >= count]
    if bad:
        have = f"{count} GPUs (0-{count - 1})" if count > 1 else "1 GPU (0)"
        pins = ", ".join(f"{m.name} (gpu: {m.gpu})" for m in bad)
        raise DeclarationError(
            f"model declaration pins {pins}, but {where} has {have}: pin a GPU it has, drop "
            f"`gpu` to let the planner place the model, or deploy an instance type with more "
            f"GPUs")


def load(path: Path = DECLARATION) -> list[ModelSpec]:
    try:
        raw = yaml.safe_load(path.read_text())
        return Declaration.model_validate(raw).llm_models
    except FileNotFoundError:
        raise DeclarationError(f"model declaration {path} does not exist") from None
    except ValidationError as e:
        lines = [f"  {'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise DeclarationError(f"model declaration {path} is invalid:\n" + "\n".join(lines)) \
            from None
