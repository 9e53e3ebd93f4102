"""Recipe schema v1: what to build (model, quantization per module group, target, runtime, validation gate).

Loading: YAML (syntax errors with line/column) -> `extends` deep-merge (child wins) -> `--set a.b=c`
overrides (values parsed as YAML scalars) -> pydantic validation with unknown keys rejected by key path with a
did-you-mean. `lock_yaml()` is the fully resolved recipe stored in every artifact; `digest(section)` feeds the
stage cache keys.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dsv4c.compiler.errors import CheckpointInvalidError, RecipeError
from dsv4c.graphs.config import PRESETS

QUANT_PRESETS = {
    "official": {"experts": "fp4", "dense": "fp8", "activations": "fp8", "kv_cache": "fp8", "indexer": "fp4"},
    "plain": {"experts": "fp4", "dense": "fp8", "activations": "none", "kv_cache": "bf16", "indexer": "bf16"},
}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Synthetic(Strict):
    preset: str = Field(description="Model preset: " + ", ".join(PRESETS))
    seed: int = 0

    @model_validator(mode="after")
    def known_preset(self):
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
        return self


class ModelSource(Strict):
    checkpoint: str | None = Field(None, description="Official-format HF checkpoint directory")
    synthetic: Synthetic | None = Field(None, description="A deterministic synthetic checkpoint")
    preset: str | None = Field(None, description="Published shapes for `plan` when the weights are not at hand")

    @model_validator(mode="after")
    def one_source(self):
        if (self.checkpoint is None) == (self.synthetic is None):
            raise ValueError("give exactly one of model.checkpoint or model.synthetic")
        return self


class Quantization(Strict):
    preset: Literal["official", "plain"] = "official"
    experts: Literal["fp4", "fp8", "w4a16", "int8", "int4", "bf16"] | None = None
    dense: Literal["fp8", "int8", "bf16"] | None = None
    activations: Literal["fp8", "none"] | None = None
    kv_cache: Literal["fp8", "bf16"] | None = None
    indexer: Literal["fp4", "bf16"] | None = None
    on_unsupported: Literal["error", "fallback"] = "error"

    @model_validator(mode="after")
    def fill_from_preset(self):
        for k, v in QUANT_PRESETS[self.preset].items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        return self


class Parallel(Strict):
    tensor: int = Field(1, ge=1)
    expert: int = Field(1, ge=1)
    pipeline: int = Field(1, ge=1)
    data: int = Field(1, ge=1)


class Target(Strict):
    kind: Literal["cpu", "tensorrt", "cann"]
    arch: Literal["sm_90", "sm_100"] | None = None
    soc_version: Literal["Ascend910B", "Ascend950"] | None = None
    devices_per_node: int = Field(1, ge=1)
    nodes: int = Field(1, ge=1)
    parallel: Parallel = Parallel()
    device_memory_gib: float | None = None

    @model_validator(mode="after")
    def hardware_matches_kind(self):
        if self.kind == "tensorrt" and self.arch is None:
            raise ValueError("target.kind tensorrt needs target.arch (sm_90 or sm_100)")
        if self.kind == "cann" and self.soc_version is None:
            raise ValueError("target.kind cann needs target.soc_version (Ascend910B or Ascend950)")
        if self.kind == "cpu" and (self.arch or self.soc_version):
            raise ValueError("target.kind cpu takes neither arch nor soc_version")
        p = self.parallel
        if p.tensor * p.pipeline * p.data != self.devices_per_node * self.nodes:
            raise ValueError(f"parallel layout tensor*pipeline*data = {p.tensor * p.pipeline * p.data} must equal "
                             f"devices_per_node*nodes = {self.devices_per_node * self.nodes} (expert parallelism "
                             "shares the tensor-parallel devices)")
        return self


class Runtime(Strict):
    max_batch_size: int = Field(2, ge=1, le=1024)
    max_seq_len: int = Field(4096, ge=16, le=1048576)


class Validate(Strict):
    prompts: int = Field(2, ge=1)
    prompt_len: int = Field(24, ge=2)
    decode_steps: int = Field(16, ge=0)
    seed: int = 0
    min_cosine: float = 0.999
    require_top1: bool = True
    max_kl: float = 0.01


class Recipe(Strict):
    schema_version: Literal[1] = 1
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    model: ModelSource
    quantization: Quantization = Quantization()
    target: Target
    runtime: Runtime = Runtime()
    validate_: Validate = Field(Validate(), alias="validate")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @property
    def validate(self) -> Validate:  # type: ignore[override]
        return self.validate_

    def resolved(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def lock_yaml(self) -> str:
        return yaml.safe_dump(self.resolved(), sort_keys=True)

    def digest(self, section: str | None = None) -> str:
        data = self.resolved() if section is None else self.resolved()[section]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


# ---- loading ----------------------------------------------------------------------------------------------------
def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise RecipeError(f"{path}{where}: YAML syntax error: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of keys")
    return data


def _merge(base: dict, child: dict) -> dict:
    out = dict(base)
    for k, v in child.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _load_tree(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise RecipeError(f"{path}: `extends` cycle: " + " -> ".join(str(p) for p in (*seen, path)))
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("checkpoint"), str):
        model["checkpoint"] = str((path.parent / model["checkpoint"]).resolve())
    if parent is None:
        return data
    return _merge(_load_tree(path.parent / parent, (*seen, path)), data)


def _apply_override(data: dict, override: str) -> None:
    if "=" not in override:
        raise RecipeError(f"--set {override!r}: expected KEY=VALUE, e.g. runtime.max_batch_size=4")
    key, raw = override.split("=", 1)
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        if not isinstance(node.setdefault(p, {}), dict):
            raise RecipeError(f"--set {key}: {p!r} is not a section")
        node = node[p]
    node[parts[-1]] = yaml.safe_load(raw)


def _explain(e: ValidationError, path: Path) -> RecipeError:
    errors = e.errors()
    err = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])  # a typo explains the rest
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
    if err["type"] == "extra_forbidden":
        parent = _model_at(err["loc"][:-1])
        known = list(parent.model_fields) if parent else []
        known = [Recipe.model_fields["validate_"].alias if k == "validate_" else k for k in known]
        guess = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
        hint = f"; did you mean `{'.'.join([*map(str, err['loc'][:-1]), guess[0]])}`?" if guess else ""
        return RecipeError(f"{path}: unknown key `{loc}`{hint}")
    return RecipeError(f"{path}: `{loc}`: {err['msg']}" + (f" (got {err['input']!r})" if "input" in err and
                                                            not isinstance(err["input"], dict) else ""))


def _model_at(loc) -> type[BaseModel] | None:
    model: type[BaseModel] = Recipe
    for part in loc:
        field = model.model_fields.get("validate_" if part == "validate" else str(part))
        if field is None:
            return None
        ann = field.annotation
        inner = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            return None
        model = inner[0]
    return model


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    path = Path(path)
    data = _load_tree(path)
    for o in overrides:
        _apply_override(data, o)
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise _explain(e, path) from None


def check_model_source(recipe: Recipe) -> None:
    """The checkpoint directory exists (exit 7 otherwise); synthetic models always do."""
    ckpt = recipe.model.checkpoint
    if ckpt is not None and not Path(ckpt).is_dir():
        raise CheckpointInvalidError(f"{ckpt}: checkpoint directory not found (model.checkpoint)")


def recipe_json_schema() -> dict[str, Any]:
    return Recipe.model_json_schema(by_alias=True)
