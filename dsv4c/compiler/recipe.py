"""Recipe schema v1: what to build — model, quantization per module group, target, runtime, validation gate.

Loading (`load_recipe`):
  YAML (syntax errors with file:line:column) -> `extends` chain, deep-merged (child wins, lists replace, cycles
  refused) -> `--set a.b=c` overrides (values parsed as YAML) -> pydantic validation (strict types, unknown keys
  refused). Every failure is a `RecipeError` (exit 2) whose first line is `FILE:LINE:COL: key.path: what is wrong`.

Schema decisions worth knowing:
  * `model` names where the weights come from and what shape they have:
      - `synthetic: {preset, seed}`: a deterministic random checkpoint of a preset shape (tests, demos).
      - `checkpoint: DIR`: an official-format checkpoint; the shapes come from its `config.json`.
      - `preset: NAME` (alone or with `checkpoint`): the published shapes, so `plan` can run before the weights
        are downloaded. The checkpoint is needed only when the build loads weights (`check_model_source`, exit 7),
        and is then checked against the preset. `--set model.checkpoint=DIR` supplies it at build time.
  * `quantization.preset` expands to the five group formats; keys written in the recipe win over the preset.
    With `on_unsupported: fallback` the target may replace a format it cannot run; `quantization.fallback` pins
    which format it must use per group (otherwise the target's documented default). Applied fallbacks are
    recorded in the artifact manifest, never silent.
  * `target.parallel` (see `Parallel`): tensor * pipeline * data = devices_per_node * nodes, and expert divides
    tensor * data. Omitted, it defaults to tensor = expert = devices_per_node, pipeline = nodes, data = 1.

`Recipe.lock_yaml()` is the fully resolved recipe stored in every artifact (loading it again gives the same
digest); `Recipe.digest(section)` feeds the compiler's stage cache keys.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dsv4c.compiler.errors import CheckpointInvalidError, RecipeError
from dsv4c.graphs.config import PRESETS, ConfigError, ModelConfig, preset

SCHEMA_VERSION = 1
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"
MAX_SEQ_LEN = 1048576  # the published models' max_position_embeddings

PresetName = Literal[tuple(PRESETS)]  # type: ignore[valid-type]  # the model presets of dsv4c.graphs.config
ExpertFormat = Literal["fp4", "fp8", "w4a16", "int8", "int4", "bf16"]
DenseFormat = Literal["fp8", "int8", "bf16"]
ActivationFormat = Literal["fp8", "none"]
KvCacheFormat = Literal["fp8", "bf16"]
IndexerFormat = Literal["fp4", "bf16"]
GROUPS = ("experts", "dense", "activations", "kv_cache", "indexer")

QUANT_PRESETS: dict[str, dict[str, str]] = {
    # DeepSeek's shipped numerics, QAT simulations included (FP8-simulated KV, FP4 indexer).
    "official": {"experts": "fp4", "dense": "fp8", "activations": "fp8", "kv_cache": "fp8", "indexer": "fp4"},
    # Weights as shipped (dequantized exactly inside the kernels), fp32 activations, no activation quantization,
    # no QAT simulation: the numerics of other implementations (transformers), for differential testing.
    "plain": {"experts": "fp4", "dense": "fp8", "activations": "none", "kv_cache": "bf16", "indexer": "bf16"},
}

# The TensorRT parts we know, by exact SM. `device` is optional; it lets `plan` pick the memory size (H100 and
# H200 are both sm_90).
TENSORRT_DEVICES: dict[str, str] = {"H100": "sm_90", "H200": "sm_90", "H20": "sm_90", "H800": "sm_90",
                                    "B200": "sm_100", "B300": "sm_100", "GB200": "sm_100"}
DeviceName = Literal[tuple(TENSORRT_DEVICES)]  # type: ignore[valid-type]


class _Rule(ValueError):
    """A cross-field rule broken at `key` (relative to the section whose validator raised it)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


class Section(BaseModel):
    # strict: a YAML string is never silently turned into a number or a boolean.
    model_config = ConfigDict(extra="forbid", strict=True)


# ---- model ------------------------------------------------------------------------------------------------------
class SyntheticModel(Section):
    preset: PresetName = Field(description="Shape preset of the generated checkpoint (dsv4c.graphs.config.PRESETS).")
    seed: int = Field(0, ge=0, description="Seed of the deterministic random weights.")


class ModelSource(Section):
    """Exactly one of `synthetic` or (`checkpoint` and/or `preset`)."""

    checkpoint: str | None = Field(None, description=(
        "Official-format DeepSeek-V4 checkpoint directory (config.json + safetensors), relative to the recipe "
        "file; absolute in the lock. Needed only when the build loads weights."))
    preset: PresetName | None = Field(None, description=(
        "Published shapes (v4-flash, v4-pro, ...): lets `plan` run without the weights. With `checkpoint`, the "
        "checkpoint's config.json must match it."))
    synthetic: SyntheticModel | None = Field(None, description="A deterministic synthetic checkpoint.")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        if self.synthetic is not None and (self.checkpoint is not None or self.preset is not None):
            other = "checkpoint" if self.checkpoint is not None else "preset"
            raise _Rule(other, "cannot be combined with `model.synthetic` (a synthetic model takes its shapes from "
                               "`model.synthetic.preset`); keep one of them")
        if self.synthetic is None and self.checkpoint is None and self.preset is None:
            raise _Rule("", "needs a source: `checkpoint: DIR`, `preset: NAME` (plan without weights) or "
                            "`synthetic: {preset: NAME, seed: N}`")
        return self

    @property
    def preset_name(self) -> str | None:
        """The shape preset, when the recipe names one (synthetic or published)."""
        return self.synthetic.preset if self.synthetic is not None else self.preset

    def shapes(self) -> ModelConfig:
        """The model configuration `plan` works from: the preset, else the checkpoint's config.json."""
        if self.preset_name is not None:
            return preset(self.preset_name)
        try:
            return ModelConfig.from_json_file(Path(self.checkpoint) / "config.json")  # type: ignore[arg-type]
        except ConfigError as e:
            raise CheckpointInvalidError(str(e), hint="set model.preset to plan without the checkpoint") from None


# ---- quantization -----------------------------------------------------------------------------------------------
class FallbackFormats(Section):
    """Per group: the format to use where the target cannot run the requested one."""

    experts: ExpertFormat | None = None
    dense: DenseFormat | None = None
    activations: ActivationFormat | None = None
    kv_cache: KvCacheFormat | None = None
    indexer: IndexerFormat | None = None


class Quantization(Section):
    preset: Literal["official", "plain"] = Field("official", description=(
        "official: experts fp4, dense fp8, activations fp8, kv_cache fp8, indexer fp4 (DeepSeek's shipped numerics "
        "incl. QAT simulations) | plain: weights as shipped, fp32 activations, no activation quantization and no QAT "
        "simulation (the numerics of transformers' implementation, for differential testing). "
        "Group keys written in the recipe win over the preset."))
    experts: ExpertFormat | None = Field(None, description="Routed-expert weights (default: from preset).")
    dense: DenseFormat | None = Field(None, description="Attention, shared-expert and other dense linear weights.")
    activations: ActivationFormat | None = Field(None, description="Activation quantization before FP8 GEMMs.")
    kv_cache: KvCacheFormat | None = Field(None, description="fp8: the reference's FP8 simulation of non-RoPE dims.")
    indexer: IndexerFormat | None = Field(None, description="Lightning indexer (fp4: Hadamard + FP4 QAT simulation).")
    on_unsupported: Literal["error", "fallback"] = Field("error", description=(
        "error: a format the target cannot run makes the recipe infeasible (exit 3) | fallback: the target substitutes "
        "a supported format (pinned by `fallback`, else its default) and records it in the manifest."))
    fallback: FallbackFormats | None = Field(None, description=(
        "Per group, the substitute format when the target cannot run the requested one (needs on_unsupported: "
        "fallback)."))

    @model_validator(mode="after")
    def _expand_preset(self) -> Quantization:
        for group, fmt in QUANT_PRESETS[self.preset].items():
            if getattr(self, group) is None:
                setattr(self, group, fmt)
        if self.fallback is not None and self.on_unsupported != "fallback":
            raise _Rule("fallback", "only used with `on_unsupported: fallback`; set that or drop `fallback`")
        return self

    def fallback_for(self, group: str) -> str | None:
        """The pinned substitute for `group`, if the recipe pins one."""
        return getattr(self.fallback, group) if self.fallback is not None else None


# ---- target -----------------------------------------------------------------------------------------------------
class Parallel(Section):
    """How the devices are used (the mesh of dsv4c.graphs.parallel). Rules: tensor * pipeline * data =
    devices_per_node * nodes (every device runs one tensor-parallel shard of one data replica), and expert divides
    tensor * data (expert groups are consecutive ranks). `plan` also checks the degrees against the model's shapes
    and refuses pipeline > 1, which this dsv4c does not implement."""

    tensor: int = Field(1, ge=1, description=(
        "Tensor-parallel degree: attention heads, o-groups, indexer heads and the vocabulary (embedding, head)."))
    expert: int = Field(1, ge=1, description="Expert-parallel degree: routed experts sharded over this many devices.")
    pipeline: int = Field(1, ge=1, description="Pipeline stages (contiguous layer ranges); only 1 is implemented.")
    data: int = Field(1, ge=1, description=(
        "Data replicas of each tensor group; they run the same batch (more devices for the experts)."))


class Target(Section):
    kind: Literal["cpu", "tensorrt", "cann"] = Field(description="Backend the artifact runs on.")
    arch: Literal["sm_90", "sm_100"] | None = Field(None, description="tensorrt only (required): exact SM.")
    soc_version: Literal["Ascend910B", "Ascend950"] | None = Field(None, description="cann only (required).")
    device: DeviceName | None = Field(None, description=(
        "tensorrt only, optional: the GPU part (must match arch); selects the memory size in the hardware table."))
    devices_per_node: int = Field(1, ge=1, le=64, description="Accelerators per node.")
    nodes: int = Field(1, ge=1, le=1024, description="Nodes.")
    parallel: Parallel = Field(default_factory=Parallel, description=(
        "Omitted: tensor = expert = devices_per_node, pipeline = nodes, data = 1."))
    device_memory_gib: float | None = Field(None, gt=0, description="Override the hardware table's device memory.")

    @model_validator(mode="before")
    @classmethod
    def _default_layout(cls, data: Any) -> Any:
        # The usual layout for one model on whole nodes: TP (and EP) inside a node, one pipeline stage per node.
        if isinstance(data, dict) and "parallel" not in data:
            dpn, nodes = data.get("devices_per_node", 1), data.get("nodes", 1)
            if type(dpn) is int and type(nodes) is int and dpn >= 1 and nodes >= 1:  # else: field errors
                data = {**data, "parallel": {"tensor": dpn, "expert": dpn, "pipeline": nodes, "data": 1}}
        return data

    @model_validator(mode="after")
    def _hardware_and_layout(self) -> Target:
        self._check_hardware()
        p, world = self.parallel, self.devices_per_node * self.nodes
        if p.tensor * p.pipeline * p.data != world:
            raise _Rule("parallel", f"tensor*pipeline*data = {p.tensor}*{p.pipeline}*{p.data} = "
                                    f"{p.tensor * p.pipeline * p.data} must equal devices_per_node*nodes = {world}")
        if (p.tensor * p.data) % p.expert:
            raise _Rule("parallel.expert", f"{p.expert} must divide tensor*data = {p.tensor * p.data} (experts are "
                                           "sharded over the devices of one pipeline stage)")
        return self

    def _check_hardware(self) -> None:
        needs = {"tensorrt": "arch", "cann": "soc_version"}.get(self.kind)
        if needs is not None and getattr(self, needs) is None:
            allowed = " | ".join(_literal_values(Target.model_fields[needs].annotation))
            raise _Rule(needs, f"required for kind {self.kind} ({allowed})")
        for key in ("arch", "soc_version", "device"):
            allowed_for = {"arch": "tensorrt", "soc_version": "cann", "device": "tensorrt"}[key]
            if getattr(self, key) is not None and self.kind != allowed_for:
                raise _Rule(key, f"applies to kind {allowed_for} only; remove it for kind {self.kind}")
        if self.device is not None and TENSORRT_DEVICES[self.device] != self.arch:
            raise _Rule("device", f"{self.device} is {TENSORRT_DEVICES[self.device]}, but target.arch is {self.arch}")

    @property
    def world_size(self) -> int:
        return self.devices_per_node * self.nodes


# ---- runtime and validation ------------------------------------------------------------------------------------
class Runtime(Section):
    max_batch_size: int = Field(2, ge=1, le=4096, description="Sequences per session (engine batch dimension).")
    max_seq_len: int = Field(4096, ge=1, le=MAX_SEQ_LEN, description="Tokens per sequence, prompt included.")


class Validate(Section):
    """The build's numerics gate: the engine against the PyTorch reference on seeded prompts.

    Left out, the prompt length is sized from the model (every layer type does its work) and the thresholds are
    derived from the reference's own sensitivity on those prompts (dsv4c.compiler.validation); written, a key
    overrides what would have been derived, and the report says which figures came from where."""

    prompts: int = Field(2, ge=1, description=(
        "Seeded prompts of unequal lengths, run in batches of at most runtime.max_batch_size."))
    prompt_len: int | None = Field(None, ge=2, description=(
        "Length of the longest prompt. Default: sized from the model so the window wraps, every compressed layer "
        "type emits >= 2 entries and the CSA top-k binds, clamped to runtime.max_seq_len - decode_steps."))
    decode_steps: int = Field(16, ge=0, description="Teacher-forced decode steps after the prefill.")
    seed: int = Field(0, ge=0)
    min_cosine: float | None = Field(None, ge=-1.0, le=1.0, description=(
        "Cosine a logit row or cache check needs to agree. Default: 0.9999 in continuous numerics (plain), 0.999 "
        "in DeepSeek's discontinuous ones."))
    require_top1: bool = Field(True, description="Require the same top-1 token as the reference at every step.")
    top1_margin: float = Field(0.0, ge=0.0, description=(
        "With require_top1: positions where the reference's top-1 logit leads its runner-up by no more than this "
        "are near-ties and exempt (0: every position). See README 'Validation' for why discontinuous numerics "
        "need it on tiny random models."))
    max_kl: float = Field(0.01, ge=0.0, description="Maximum KL(reference || engine) of an agreeing row.")
    agreement: float | None = Field(None, gt=0.0, le=1.0, description=(
        "Fraction of logit rows (steps x prompts) and per-step cache checks that must agree (cosine >= min_cosine, "
        "top-1, KL). Default: derived from the reference's own agreement under a 1e-6 perturbation (README "
        "'Validation'); 1.0 in continuous numerics."))
    floor_cosine: float | None = Field(None, ge=-1.0, le=1.0, description=(
        "Every row and cache check, agreeing or not, must reach this cosine. Default: derived from the "
        "reference's own worst row under a 1e-6 perturbation."))


# ---- the recipe -------------------------------------------------------------------------------------------------
class Recipe(Section):
    schema_version: Literal[1] = Field(SCHEMA_VERSION, description="Recipe schema version (this dsv4c reads 1).")
    name: str = Field(pattern=NAME_PATTERN, max_length=64, description="Artifact name: [a-z0-9][a-z0-9._-]*")
    model: ModelSource
    quantization: Quantization = Field(default_factory=Quantization)
    target: Target
    runtime: Runtime = Field(default_factory=Runtime)
    # `validate` is a BaseModel method name, hence the alias; read it as `recipe.validate`.
    validate_: Validate = Field(default_factory=Validate, alias="validate")

    @model_validator(mode="after")
    def _gate_fits_runtime(self) -> Recipe:
        v, rt = self.validate_, self.runtime
        # (prompts are run in batches of at most max_batch_size, so their number is not limited by it)
        if v.decode_steps + 2 > rt.max_seq_len:
            raise _Rule("validate.decode_steps", f"{v.decode_steps} decode steps after a prompt of at least 2 tokens "
                                                 f"do not fit runtime.max_seq_len = {rt.max_seq_len}")
        if v.prompt_len is not None and v.prompt_len + v.decode_steps > rt.max_seq_len:
            raise _Rule("validate.prompt_len", f"prompt_len + decode_steps = {v.prompt_len + v.decode_steps} is "
                                               f"more than runtime.max_seq_len = {rt.max_seq_len}")
        return self

    @property
    def validate(self) -> Validate:  # type: ignore[override]
        return self.validate_

    def resolved(self) -> dict[str, Any]:
        """The resolved recipe as plain JSON-able data, in schema order."""
        return self.model_dump(mode="json", by_alias=True)

    def lock_yaml(self) -> str:
        head = (f"# dsv4c recipe lock (schema v{SCHEMA_VERSION}): extends merged, presets expanded, defaults filled,"
                " paths absolute.\n")
        return head + yaml.safe_dump(self.resolved(), sort_keys=False, width=1 << 16)

    def digest(self, section: str | None = None) -> str:
        """sha256 of the canonical JSON of the resolved recipe, or of one top-level section."""
        data = self.resolved()
        if section is not None:
            if section not in data:
                raise KeyError(f"recipe has no section {section!r}; sections: {', '.join(data)}")
            data = data[section]
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()


# ---- loading: YAML with positions --------------------------------------------------------------------------------
Positions = dict[tuple[str, ...], str]  # key path -> "file:line:col" (or "--set k=v") where it was written


def _read_yaml(path: Path) -> tuple[dict[str, Any], Positions]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: cannot read the recipe ({e})") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        raise _syntax_error(path, text, e) from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: YAML syntax error: {e}") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        what = "empty" if data is None else f"a {type(data).__name__}"
        raise RecipeError(f"{path}: a recipe must be a mapping of keys (this file is {what})")
    positions: Positions = {}
    _record_positions(node, str(path), (), positions)
    return data, positions


def _syntax_error(path: Path, text: str, e: yaml.MarkedYAMLError) -> RecipeError:
    mark = e.problem_mark or e.context_mark
    if mark is None:
        return RecipeError(f"{path}: YAML syntax error: {e.problem or e}")
    problem = e.problem or "invalid YAML"
    if e.context:  # e.g. "while parsing a flow mapping" started at context_mark: often where the mistake is
        started = e.context_mark
        at = f" at line {started.line + 1}, column {started.column + 1}" if started and started != mark else ""
        problem = f"{problem} ({e.context}{at})"
    lines = text.splitlines()
    source = lines[mark.line] if mark.line < len(lines) else ""
    return RecipeError(f"{path}:{mark.line + 1}:{mark.column + 1}: YAML syntax error: {problem}",
                       details=[f"{mark.line + 1:4d} | {source}", "     | " + " " * mark.column + "^"])


def _record_positions(node: yaml.Node, where: str, path: tuple[str, ...], out: Positions) -> None:
    if not isinstance(node, yaml.MappingNode):
        return
    seen: set[str] = set()
    for key_node, value_node in node.value:
        key = str(key_node.value)
        at = f"{where}:{key_node.start_mark.line + 1}:{key_node.start_mark.column + 1}"
        if key in seen:  # PyYAML keeps the last silently; a recipe should not say two things
            raise RecipeError(f"{at}: duplicate key `{'.'.join((*path, key))}`")
        seen.add(key)
        out[(*path, key)] = at
        _record_positions(value_node, where, (*path, key), out)


# ---- loading: extends, overrides ---------------------------------------------------------------------------------
def _merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, anything else (scalars, lists) in the child replaces the base."""
    out = dict(base)
    for key, value in child.items():
        both_maps = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both_maps else value
    return out


def _absolute_checkpoint(data: dict[str, Any], base_dir: Path) -> None:
    # Relative to the file that wrote it, so a recipe works from any working directory (and its lock anywhere).
    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("checkpoint"), str):
        model["checkpoint"] = str((base_dir / Path(model["checkpoint"]).expanduser()).resolve())


def _load_tree(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], Positions]:
    """The merged data of `path` and its `extends` ancestors; `chain` holds the files that extend it."""
    chain = (*chain, path.resolve())
    data, positions = _read_yaml(path)
    return _extend(data, positions, path.parent, str(path), chain)


def _extend(data: dict[str, Any], positions: Positions, base_dir: Path, source: str,
            chain: tuple[Path, ...]) -> tuple[dict[str, Any], Positions]:
    """`data` (read from `source`) merged over its `extends` ancestors, paths in it relative to `base_dir`."""
    _absolute_checkpoint(data, base_dir)
    if "extends" not in data:
        return data, positions
    parent, at = data.pop("extends"), positions.pop(("extends",), source)
    if not isinstance(parent, str) or not parent:
        raise RecipeError(f"{at}: `extends` must be the path of a recipe file, relative to this one (got {parent!r})")
    parent_path = Path(os.path.normpath(base_dir / parent))
    if not parent_path.is_file():
        raise RecipeError(f"{at}: `extends`: {parent_path} not found (paths are relative to {source})")
    if parent_path.resolve() in chain:
        cycle = " -> ".join(p.name for p in (*chain, parent_path.resolve()))
        raise RecipeError(f"{at}: `extends` cycle: {cycle}")
    base, base_positions = _load_tree(parent_path, chain)
    return _merge(base, data), {**base_positions, **positions}


def _apply_override(data: dict[str, Any], positions: Positions, override: str) -> None:
    where = f"--set {override}"
    key, sep, raw = override.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise RecipeError(f"{where}: expected KEY=VALUE with a dotted key, e.g. --set runtime.max_batch_size=4")
    _check_override_path(parts, where)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise RecipeError(f"{where}: the value is not valid YAML ({getattr(e, 'problem', e)})") from None
    node = data
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise RecipeError(f"{where}: `{'.'.join(parts[: i + 1])}` is {node[part]!r} in the recipe, not a section")
        node = node[part]
    last = parts[-1]
    both_maps = isinstance(value, dict) and isinstance(node.get(last), dict)
    node[last] = _merge(node[last], value) if both_maps else value
    if parts == ["model", "checkpoint"] and isinstance(value, str):
        node[last] = str(Path(value).expanduser().resolve())  # a command-line path is relative to the cwd
    for stale in [p for p in positions if p[: len(parts)] == tuple(parts)]:
        del positions[stale]
    positions[tuple(parts)] = where


def _check_override_path(parts: Sequence[str], where: str) -> None:
    """Every segment of an override key must be a schema key, and only the last may be a value."""
    model: type[BaseModel] | None = Recipe
    for i, part in enumerate(parts):
        dotted = ".".join(parts[: i + 1])
        if model is None:
            raise RecipeError(f"{where}: `{'.'.join(parts[:i])}` is a value, not a section; no key `{dotted}`")
        fields = _field_names(model)
        if part not in fields:
            raise RecipeError(f"{where}: unknown key `{dotted}`" + _did_you_mean(part, fields, parts[:i]))
        model = _section_model(model, part)


# ---- schema introspection (for messages) -------------------------------------------------------------------------
def _field_names(model: type[BaseModel]) -> dict[str, str]:
    """Key as written in a recipe (the alias) -> python field name."""
    return {(f.alias or name): name for name, f in model.model_fields.items()}


def _section_model(model: type[BaseModel], key: str) -> type[BaseModel] | None:
    annotation = model.model_fields[_field_names(model)[key]].annotation
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _annotation_at(loc: Sequence[str]) -> Any:
    model: type[BaseModel] | None = Recipe
    for part in loc[:-1]:
        if model is None or part not in _field_names(model):
            return None
        model = _section_model(model, part)
    if model is None or not loc or loc[-1] not in _field_names(model):
        return None
    return model.model_fields[_field_names(model)[loc[-1]]].annotation


def _literal_values(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) is Literal:
        return list(typing.get_args(annotation))
    return [v for arg in typing.get_args(annotation) for v in _literal_values(arg)]


def _did_you_mean(word: str, candidates: Iterable[str], prefix: Sequence[str] = ()) -> str:
    candidates = list(candidates)
    guess = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    if guess:
        return f"; did you mean `{'.'.join((*prefix, guess[0]))}`?"
    return f"; allowed here: {', '.join(candidates)}"


# ---- validation errors -> RecipeError ----------------------------------------------------------------------------
_EXPECTED_TYPE = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
                  "model": "a mapping of keys", "dict": "a mapping of keys"}


def _describe(err: dict[str, Any]) -> tuple[tuple[str, ...], str]:
    """(key path, message starting with the key path) for one pydantic error."""
    loc = tuple(str(p) for p in err["loc"])
    kind, got = err["type"], err.get("input")
    if kind == "value_error" and isinstance(err.get("ctx", {}).get("error"), _Rule):
        rule = err["ctx"]["error"]
        loc = loc + tuple(rule.key.split(".")) if rule.key else loc
        return loc, f"`{'.'.join(loc) or 'recipe'}`: {rule}"
    dotted = ".".join(loc)
    if kind == "extra_forbidden":
        parent = _annotation_at(loc[:-1]) if len(loc) > 1 else Recipe
        parent_model = next((a for a in (parent, *typing.get_args(parent))
                             if isinstance(a, type) and issubclass(a, BaseModel)), None)
        fields = _field_names(parent_model) if parent_model else {}
        return loc, f"unknown key `{dotted}`" + (_did_you_mean(loc[-1], fields, loc[:-1]) if fields else "")
    if loc == ("schema_version",) and kind == "literal_error":
        return loc, f"`schema_version`: this dsv4c reads recipe schema {SCHEMA_VERSION}, not {got!r}; upgrade dsv4c"
    allowed = _literal_values(_annotation_at(loc))
    if kind == "missing":
        options = f" ({' | '.join(map(str, allowed))})" if allowed else ""
        return loc, f"`{dotted}` is required{options}"
    if kind == "literal_error":
        text = f"`{dotted}`: {got!r} is not one of {' | '.join(map(str, allowed))}"
        guess = difflib.get_close_matches(str(got), [str(a) for a in allowed], n=1, cutoff=0.6)
        return loc, text + (f"; did you mean {guess[0]}?" if guess else "")
    if kind == "string_pattern_mismatch" and loc == ("name",):
        return loc, f"`name`: {got!r} must match {NAME_PATTERN[1:-1]} (lowercase letters, digits, '.', '_', '-')"
    base_type = kind.split("_")[0]
    if kind.endswith(("_type", "_parsing")) and base_type in _EXPECTED_TYPE:
        return loc, f"`{dotted}`: must be {_EXPECTED_TYPE[base_type]} (got {got!r})"
    msg = err["msg"].replace("Input should be", "must be").replace("Value error, ", "")
    return loc, f"`{dotted}`: {msg} (got {got!r})"


def _where(loc: tuple[str, ...], positions: Positions, default: str) -> str:
    for n in range(len(loc), 0, -1):  # the deepest key that was written down
        if loc[:n] in positions:
            return positions[loc[:n]]
    return default


def _explain(e: ValidationError, source: str, positions: Positions) -> RecipeError:
    errors = e.errors()
    # A misspelt key also makes its correct spelling "missing": report the typo, not the cascade.
    typo_parents = {tuple(x["loc"][:-1]) for x in errors if x["type"] == "extra_forbidden"}
    errors = [x for x in errors if not (x["type"] == "missing" and tuple(x["loc"][:-1]) in typo_parents)]
    errors.sort(key=lambda x: x["type"] != "extra_forbidden")
    described = [_describe(x) for x in errors]
    lines = [f"{_where(loc, positions, source)}: {text}" for loc, text in described]
    also = [f"also: {line}" for line in lines[1:4]]
    if len(lines) > 4:
        also.append(f"... and {len(lines) - 4} more")
    return RecipeError(lines[0], details=also)


# ---- public API --------------------------------------------------------------------------------------------------
def load_recipe(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Recipe:
    """Read, merge (`extends`), override (`--set`) and validate a recipe. Raises RecipeError (exit 2)."""
    path = Path(path)
    data, positions = _load_tree(path)
    return _validated(data, positions, overrides, str(path))


MAPPING_SOURCE = "<recipe mapping>"  # where a recipe given as a mapping was "written", in error messages

RecipeSource = typing.Union[str, os.PathLike, Mapping[str, Any], Recipe]


def as_recipe(source: RecipeSource, overrides: Sequence[str] = ()) -> Recipe:
    """A validated recipe from a recipe file, a mapping of recipe keys (what the file would hold; its `extends`
    and a relative `model.checkpoint` are relative to the working directory) or a loaded `Recipe`, with
    `--set`-style KEY=VALUE overrides applied. Raises RecipeError (exit 2)."""
    if isinstance(source, Recipe):
        if not overrides:
            return source
        source = source.resolved()  # overrides apply to the data, which is then validated again
    if isinstance(source, Mapping):
        data = copy.deepcopy(dict(source))  # loading resolves paths in place: the caller's mapping is left as it was
        data, positions = _extend(data, {}, Path.cwd(), MAPPING_SOURCE, ())
        return _validated(data, positions, overrides, MAPPING_SOURCE)
    if isinstance(source, (str, os.PathLike)):
        return load_recipe(source, overrides)
    raise TypeError(f"a recipe is a path, a mapping of recipe keys or a Recipe, not {type(source).__name__}")


def _validated(data: dict[str, Any], positions: Positions, overrides: Sequence[str], source: str) -> Recipe:
    for override in overrides:
        _apply_override(data, positions, override)
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise _explain(e, source, positions) from None


def check_model_source(recipe: Recipe) -> None:
    """Raise CheckpointInvalidError (exit 7) unless the weights the build will load are there.

    Only a shallow check: the directory exists and, when `model.preset` is given too, its config.json has the
    preset's shapes. The load stage verifies the tensors. Synthetic models are generated, so always pass.
    """
    model = recipe.model
    if model.synthetic is not None:
        return
    if model.checkpoint is None:
        raise CheckpointInvalidError(
            f"model.checkpoint is not set: recipe {recipe.name!r} names only model.preset={model.preset}, which is "
            "enough to plan but not to build", hint="give the official checkpoint: --set model.checkpoint=DIR")
    path = Path(model.checkpoint)
    if not path.is_dir():
        raise CheckpointInvalidError(
            f"{path}: checkpoint directory not found (model.checkpoint)",
            hint="download the official checkpoint there, or fix model.checkpoint (relative to the recipe file)")
    if model.preset is not None and (path / "config.json").is_file():
        _check_matches_preset(path / "config.json", model.preset)


def _check_matches_preset(config_json: Path, preset_name: str) -> None:
    try:
        have = ModelConfig.from_json_file(config_json)
    except ConfigError as e:
        raise CheckpointInvalidError(str(e)) from None
    want = preset(preset_name)
    diffs = [f"{name}: checkpoint {getattr(have, name)!r}, preset {getattr(want, name)!r}"
             for name in ModelConfig.__dataclass_fields__ if getattr(have, name) != getattr(want, name)]
    if diffs:
        raise CheckpointInvalidError(
            f"{config_json} does not match model.preset={preset_name} ({len(diffs)} fields differ)", details=diffs,
            hint="fix model.preset, or remove it to take the shapes from the checkpoint")


def recipe_json_schema() -> dict[str, Any]:
    """The JSON Schema of a recipe file (what `dsv4c schema` prints)."""
    schema = Recipe.model_json_schema(by_alias=True, mode="validation")
    # `extends` is resolved before validation, so it is no model field; editors validating a file need it.
    extends = {"type": "string", "description": (
        "Base recipe, relative to this file; deep-merged under this one (this file wins, lists replace).")}
    schema["properties"] = {"extends": extends, **schema["properties"]}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            **schema, "title": f"dsv4c recipe (schema v{SCHEMA_VERSION})"}


__all__ = ["Recipe", "ModelSource", "SyntheticModel", "Quantization", "FallbackFormats", "Target", "Parallel",
           "Runtime", "Validate", "GROUPS", "QUANT_PRESETS", "TENSORRT_DEVICES", "SCHEMA_VERSION", "load_recipe",
           "as_recipe", "RecipeSource", "check_model_source", "recipe_json_schema"]
