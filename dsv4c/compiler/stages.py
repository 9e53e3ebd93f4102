"""The stages of `dsv4c build`, in order, and their declarations (`PIPELINE`, run by `pipeline.execute`).

Each stage reads what the stages it is declared after left in `build.outputs`, sets its key in `build.keys` and
its own fields of `build.outputs`, and returns "cached" when it reused a stored result. quantize and export are
lazy: their stage only keys them, and the work runs when a later stage asks for the output (`reference_model`,
`exported_programs`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from dsv4c._version import __version__ as DSV4C_VERSION
from dsv4c.compiler.errors import CheckpointInvalidError, InfeasibleError, ToolchainError
from dsv4c.compiler.pipeline import STAGES, Build, Stage, Status, digest, staged_output, toolchain_versions
from dsv4c.compiler.validation import GATE_VERSION, gate_error, validate_engine
from dsv4c.files import link_tree

if TYPE_CHECKING:
    from torch.export import ExportedProgram

    from dsv4c.graphs.model import DeepseekV4


# ---- resolve: the recipe, fully resolved ----------------------------------------------------------------------
def stage_resolve(build: Build) -> Status:
    build.outputs.lock = build.recipe.lock_yaml()
    build.outputs.toolchain = toolchain_versions()
    build.keys["resolve"] = build.recipe.digest()
    return "done"


# ---- plan: can the target build this recipe here? -----------------------------------------------------------
def stage_plan(build: Build) -> Status:
    from dsv4c.targets.base import get_target

    target = get_target(build.recipe.target.kind)
    check = target.check(build.recipe)
    if build.recipe.target.world_size > 1:  # the mesh against the model's shapes (config only, no weights read)
        from dsv4c.compiler.plan import layout_problems

        check.problems += layout_problems(build.recipe.model.shapes(), build.recipe)
    if check.problems:
        raise InfeasibleError(f"recipe {build.recipe.name!r} cannot be built for target "
                              f"{build.recipe.target.kind!r}: " + "; ".join(check.problems),
                              hint="`dsv4c plan RECIPE` sizes the recipe and says what would build")
    _check_build_toolchain(build, target)
    build.outputs.target, build.outputs.check = target, check
    build.outputs.toolchain.update(check.toolchain)
    build.keys["plan"] = digest(build.keys["resolve"], check.fallbacks, check.toolchain)
    return "done"


def _check_build_toolchain(build: Build, target) -> None:
    """A build that goes past `lower` needs the target's toolchain: say so now, not after minutes of export and
    lowering (targets without a `missing_build_toolchain` build anywhere)."""
    if STAGES.index(build.until) <= STAGES.index("lower"):
        return
    missing = getattr(target, "missing_build_toolchain", lambda: None)()
    if missing:
        raise ToolchainError(missing)


# ---- load: locate (or synthesise) and verify the official-format checkpoint ----------------------------------
def stage_load(build: Build) -> Status:
    from dsv4c.compiler.recipe import check_model_source
    from dsv4c.graphs.checkpoint import CheckpointError, CheckpointReader, write_synthetic_checkpoint
    from dsv4c.graphs.config import preset

    check_model_source(build.recipe)  # here, not before the build: a plan-stage problem is reported first
    model = build.recipe.model
    status: Status = "done"
    if model.synthetic is not None:
        # stored under a key of its own (what generates it); the stage key below fingerprints the files
        cfg = preset(model.synthetic.preset)
        tokenizer = _synthetic_tokenizer(cfg.vocab_size)
        key = digest("synthetic", model.synthetic.preset, model.synthetic.seed, DSV4C_VERSION,
                     tokenizer.name)
        stored, status = build.reuse_or_make("load", key, lambda d: write_synthetic_checkpoint(
            d / "checkpoint", cfg, seed=model.synthetic.seed, tokenizer_dir=tokenizer))
        path = stored / "checkpoint"
    else:
        path = Path(model.checkpoint)
    try:
        reader = CheckpointReader(path)
        reader.verify()
    except CheckpointError as e:
        raise CheckpointInvalidError(str(e)) from e
    index = path / "model.safetensors.index.json"
    fingerprint = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.glob("*.safetensors"))]
    build.outputs.checkpoint, build.outputs.reader = path, reader
    build.keys["load"] = digest(str(path), fingerprint, index.read_text() if index.is_file() else None)
    return status


def _synthetic_tokenizer(vocab_size: int) -> Path:
    """A byte-level BPE with V4's special tokens and exactly `vocab_size` ids (built once, cached)."""
    from dsv4c.runtime.tokenizer import synthetic_tokenizer_dir

    return synthetic_tokenizer_dir(vocab_size)


# ---- quantize: the model in the engine's weight formats (lazy: only when a later stage needs it) -------------
def expert_format_for(build: Build) -> str:
    fallback = {f["group"]: f["to"] for f in build.outputs.check.fallbacks}
    return fallback.get("experts", build.recipe.quantization.experts)


def graph_expert_format(build: Build) -> str:
    """The routed-expert format of the PyTorch graph: fp4 or fp8 (a lossless transcode). Other engine formats
    (INT8/INT4 on Ascend 910B) are requantized by the target's lowering from the shipped FP4 weights."""
    fmt = expert_format_for(build)
    return fmt if fmt in ("fp4", "fp8") else "fp4"


def stage_quantize(build: Build) -> Status:
    build.keys["quantize"] = digest(build.keys["load"], build.recipe.digest("quantization"),
                                    expert_format_for(build))
    return "done"  # the runner makes it "cached" when a build with this key got here before


def quantize_model(build: Build) -> None:
    """quantize's work: the model in the engine's formats over the checkpoint, streamed (graphs.streamed): a
    block's weights are read and converted when the lowering writes them or the reference runs it, and at most
    a bounded set of blocks is held."""
    build.outputs.model = _streamed(build)


def _streamed(build: Build, shard=None) -> DeepseekV4:
    """The model (or a rank's shard) over the build's checkpoint, in its formats and numerics, streamed."""
    from dsv4c.graphs.model import Numerics
    from dsv4c.graphs.streamed import streamed_model

    return streamed_model(build.outputs.reader, Numerics.for_quantization(build.recipe.quantization),
                          graph_expert_format(build), shard)


def reference_model(build: Build) -> DeepseekV4:
    """The PyTorch model with the checkpoint's weights in the engine's formats, streamed (built on first use)."""
    build.need("quantize")
    return build.outputs.model


# ---- export: torch.export of the prefill and decode programs (lazy) -------------------------------------------
def stage_export(build: Build) -> Status:
    # the programs carry no weights: their key is the model's shapes, not its checkpoint (another checkpoint of
    # the same shapes reuses them)
    rt = build.recipe.runtime
    build.keys["export"] = key = digest(str(build.outputs.reader.config), build.recipe.digest("quantization"),
                                        expert_format_for(build), rt.max_batch_size, rt.max_seq_len,
                                        build.outputs.toolchain["torch"], build.outputs.toolchain["dsv4c_sources"])
    stored = build.cached_dir("export", key)
    return "cached" if stored and (stored / "decode.pt2").is_file() else "done"


def export_programs(build: Build) -> None:
    """export's work: the programs from the stage cache when stored, else exported now and stored. They are
    traced on the meta device (`weightless_model`): no weights in them, the lowering writes those from the
    checkpoint."""
    from dsv4c.compiler.export import PROGRAMS, export_program

    import dsv4c.graphs.ops  # noqa: F401  registers the dsv4 ops the stored programs call

    if mesh_of(build.recipe) is not None:  # a mesh exports each rank's shard inside lower, one rank at a time
        build.outputs.programs = {}
        return
    key = build.keys["export"]
    stored = build.cached_dir("export", key)
    if stored is not None and all((stored / f"{p}.pt2").is_file() for p in PROGRAMS):
        build.outputs.programs = {p: torch.export.load(stored / f"{p}.pt2") for p in PROGRAMS}
        return
    rt, model = build.recipe.runtime, _weightless(build)
    programs = {p: export_program(model, p, rt.max_batch_size, rt.max_seq_len) for p in PROGRAMS}
    build.store_dir("export", key, lambda d: [torch.export.save(ep, d / f"{p}.pt2") for p, ep in programs.items()])
    build.outputs.programs = programs


def _weightless(build: Build, shard=None) -> DeepseekV4:
    from dsv4c.compiler.export import weightless_model
    from dsv4c.graphs.model import Numerics

    return weightless_model(build.outputs.reader.config, Numerics.for_quantization(build.recipe.quantization),
                            graph_expert_format(build), shard)


def exported_programs(build: Build) -> dict[str, ExportedProgram]:
    """The torch.export programs (exported, or read from the stage cache, on first use)."""
    build.need("export")
    return build.outputs.programs


# ---- multi-device: one program pair per rank, each from that rank's shard of the checkpoint ------------------
BACKENDS = {"cpu": "gloo", "tensorrt": "nccl", "cann": "hccl"}  # the collectives' library per target


def mesh_of(recipe) -> dict | None:
    """The mesh a multi-device recipe builds (graphs/parallel.py), as the bundle and manifest record it; None for
    one device."""
    t = recipe.target
    if t.world_size == 1:
        return None
    p = t.parallel
    return {"world": t.world_size, "tensor": p.tensor, "expert": p.expert, "data": p.data,
            "devices_per_node": t.devices_per_node, "nodes": t.nodes, "backend": BACKENDS[t.kind],
            "ranks": [f"rank{r}" for r in range(t.world_size)]}


def rank_programs(build: Build, rank: int) -> tuple[dict[str, ExportedProgram], Callable[[str], torch.Tensor]]:
    """Rank `rank`'s programs (exported without weights) and its weights: its shard of the checkpoint, streamed
    (only its slices and experts are read); nothing of another rank is held."""
    from dsv4c.compiler.export import PROGRAMS, export_program, program_weights
    from dsv4c.graphs.parallel import Shard

    reader, rt = build.outputs.reader, build.recipe.runtime
    shard = Shard.for_rank(reader.config, rank, build.recipe.target.parallel)
    model = _weightless(build, shard)
    programs = {p: export_program(model, p, rt.max_batch_size, rt.max_seq_len) for p in PROGRAMS}
    return programs, program_weights(_streamed(build, shard))


def _lower_mesh(build: Build, into: Path, mesh: dict) -> None:
    """Each rank's bundle in `rank<r>`, lowered from its own programs, one rank at a time; bundle.json says the mesh."""
    build.need("export")  # reported now; the programs themselves come per rank (streaming: one shard held at once)
    meta = engine_meta(build)
    for r, name in enumerate(mesh["ranks"]):
        with build.doing(f"export + lower {name}"):
            programs, weights = rank_programs(build, r)
            (into / name).mkdir()
            build.outputs.target.lower(programs, into / name, build.recipe, {**meta, "mesh": mesh, "rank": r},
                                       weights=weights)
            del programs, weights  # the next rank's shard replaces it
    first = json.loads((into / mesh["ranks"][0] / "bundle.json").read_text())
    (into / "bundle.json").write_text(json.dumps({**first, "mesh": mesh}, indent=2))


def build_engine(target, bundle: Path, engine_dir: Path, recipe) -> None:
    """bundle -> engine files: the target's build, per rank for a mesh bundle (engine.json then says the mesh)."""
    mesh = json.loads((bundle / "bundle.json").read_text()).get("mesh")
    if mesh is None:
        target.build(bundle, engine_dir, recipe)
        return
    for name in mesh["ranks"]:
        (engine_dir / name).mkdir()
        target.build(bundle / name, engine_dir / name, recipe)
    first = json.loads((engine_dir / mesh["ranks"][0] / "engine.json").read_text())
    (engine_dir / "engine.json").write_text(json.dumps({**first, "mesh": mesh}, indent=2))


def engine_meta(build: Build) -> dict:
    """What the runtime needs besides the programs: cache layout, vocab, eos (from a meta-device model: no
    weights are read for it)."""
    cfg, rt = build.outputs.reader.config, build.recipe.runtime
    model = _weightless(build)
    return {"cache": [{"name": e.name, "shape": list(e.shape[1:]), "fill": e.fill,
                       "dtype": str(e.dtype).removeprefix("torch.")}  # what the runtime allocates the cache as
                      for e in model.cache_spec(1, rt.max_seq_len)],
            "vocab_size": cfg.vocab_size, "eos_token_id": cfg.eos_token_id,
            "expert_format": model.expert_format, "numerics": vars(model.numerics)}


# ---- lower: exported programs -> the target's bundle ----------------------------------------------------------
def stage_lower(build: Build) -> Status:
    from dsv4c.compiler.export import program_weights

    # the programs (export) and the weights the lowering writes into the bundle (quantize: the checkpoint)
    key = digest(build.keys["export"], build.keys["quantize"], build.recipe.digest("target"), build.outputs.toolchain)
    build.keys["lower"] = key
    mesh = mesh_of(build.recipe)

    def lower(into: Path) -> None:
        if mesh is None:
            build.outputs.target.lower(exported_programs(build), into, build.recipe, engine_meta(build),
                                       weights=program_weights(reference_model(build)))
        else:
            _lower_mesh(build, into, mesh)

    build.outputs.bundle, status = build.reuse_or_make("lower", key, lower)
    if build.until == "lower":  # `--until lower`: the relocatable bundle is the output
        _publish(build, validation=None, kind="bundle")
    return status


# ---- build: bundle -> engine files ------------------------------------------------------------------------------
def stage_build(build: Build) -> Status:
    from dsv4c.targets.base import ToolchainMissing

    key = digest(build.keys["lower"], build.outputs.toolchain)
    build.keys["build"] = key
    try:
        path, status = build.reuse_or_make("build", key, lambda d: build_engine(
            build.outputs.target, build.outputs.bundle, d, build.recipe))
    except ToolchainMissing as e:
        raise ToolchainError(str(e)) from e
    build.outputs.engine_dir = path
    build.outputs.engine_info = json.loads((path / "engine.json").read_text())
    return status


# ---- validate: the built engine against the PyTorch reference -------------------------------------------------
def stage_validate(build: Build) -> Status:
    key = digest(build.keys["build"], build.recipe.digest("validate"), GATE_VERSION)
    build.keys["validate"] = key
    stored, status = build.reuse_or_make("validate", key, lambda d: _write_validation(build, key, d))
    build.outputs.validation = json.loads((stored / "validation.json").read_text())
    return status


def _write_validation(build: Build, key: str, into: Path) -> None:
    """Run the engine, laid out as its artifact will be, against the reference; a failed gate raises (and its
    report is kept under the cache, for the error to point at) instead of being stored. The layout is hard links
    to the engine's files, made beside the engine in the stage cache (one filesystem: never a copy of the
    weights); beside the output only when the cache is read-only."""
    engine = build.outputs.engine_dir
    in_readonly_cache = build.cache_mode == "readonly" and engine.is_relative_to(build.cache_dir)
    near = build.out_dir.parent if in_readonly_cache else engine.parent
    staging = near / f".{build.out_dir.name}-{key}.validate"
    shutil.rmtree(staging, ignore_errors=True)  # left by a build that was killed
    staging.mkdir(parents=True)
    try:
        _assemble(build, staging, validation=None)
        report = validate_engine(staging, reference_model(build), build.recipe.validate)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not report["passed"]:
        kept = build.cache_dir / "failed-validation" / f"{build.recipe.name}-{key}.json"
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_text(json.dumps(report, indent=2))
        raise gate_error(report, kept)
    (into / "validation.json").write_text(json.dumps(report, indent=2))


# ---- package: the artifact directory, written atomically ------------------------------------------------------
def stage_package(build: Build) -> Status:
    build.keys["package"] = key = digest(build.keys["validate"], build.outputs.lock)
    if _existing_package_key(build.out_dir) == key:
        build.outputs.artifact = build.out_dir
        return "cached"  # the artifact at the output path is this exact build, verified against its manifest
    _publish(build, validation=build.outputs.validation)
    return "done"


def _existing_package_key(out: Path) -> str | None:
    from dsv4c.artifact import ArtifactError, read_manifest

    if not (out / "manifest.json").is_file():
        return None
    try:
        return read_manifest(out, verify=True).data.get("stage_keys", {}).get("package")
    except (ArtifactError, ValueError, KeyError):
        return None


def _publish(build: Build, validation: dict | None, kind: str = "engine") -> None:
    """Assemble the artifact beside the output and swap it into place."""
    with staged_output(build.out_dir) as staging:
        _assemble(build, staging, validation, kind)
    build.outputs.artifact = build.out_dir


def _kernel_fallbacks(engine_info: dict) -> list[dict[str, str]]:
    """An engine running portable fallbacks instead of its native kernels says so in the manifest."""
    kernels = engine_info.get("kernels", {})
    if kernels.get("implementation") in (None, "cpp", "native"):
        return []
    return [{"group": "kernels", "from": "native", "to": kernels["implementation"], "reason": kernels.get("reason", "")}]


def _validation_summary(report: dict) -> dict:
    """What the manifest keeps of validation.json: the verdict, the thresholds and where they came from, and
    what each layer type did (the full report sits beside it)."""
    keys = ("passed", "agreement", "min_cosine", "top1_equal", "max_kl", "thresholds", "threshold_derivation",
            "coverage", "prompts", "decode_steps")
    return {k: report[k] for k in keys if k in report}


def _assemble(build: Build, root: Path, validation: dict | None, kind: str = "engine") -> None:
    """Lay out an artifact in `root`, an empty directory (manifest last). kind "engine": the built engine; kind
    "bundle": the target's lowered bundle (`--until lower`), which `dsv4c build --from-bundle` turns into an
    engine elsewhere."""
    from dsv4c.artifact import write_manifest

    out = build.outputs
    source = out.engine_dir if kind == "engine" else out.bundle
    # the stage cache's files, hard-linked: the artifact adds no copy of the weights (dsv4c.files says why that is
    # safe, and warns when the output's filesystem forces a copy)
    link_tree(source, root / "engine", skip=(".complete",))
    ckpt = out.checkpoint
    shutil.copy(ckpt / "config.json", root / "config.json")
    if (ckpt / "tokenizer.json").is_file():
        (root / "tokenizer").mkdir()
        for f in ("tokenizer.json", "tokenizer_config.json"):
            if (ckpt / f).is_file():
                shutil.copy(ckpt / f, root / "tokenizer" / f)
    (root / "recipe.lock.yaml").write_text(out.lock)
    if validation is not None:
        (root / "validation.json").write_text(json.dumps(validation, indent=2))
    r = build.recipe
    info = out.engine_info if kind == "engine" else json.loads((source / "bundle.json").read_text())
    write_manifest(root, {
        "kind": kind,
        "dsv4c_version": DSV4C_VERSION,
        "name": r.name,
        "recipe_sha256": build.keys["resolve"],
        "target": {"kind": r.target.kind, "arch": r.target.arch, "soc_version": r.target.soc_version},
        "runtime": {"max_batch_size": r.runtime.max_batch_size, "max_seq_len": r.runtime.max_seq_len},
        "engine": info,
        "toolchain": out.toolchain,
        "fallbacks": out.check.fallbacks + _kernel_fallbacks(info),
        "stage_keys": build.keys,
        "inputs": {"checkpoint": str(ckpt), "checkpoint_key": build.keys["load"]},
        "validation": None if validation is None else _validation_summary(validation),
    })


# The stages in pipeline order, each after the stages whose outputs it reads, for `pipeline.execute`: the
# pipeline is handed them rather than importing this module, which builds on the pipeline's `Build` (an import
# both ways would be a cycle). resolve, plan and quantize store nothing (cheap, or kept in memory only).
PIPELINE: tuple[Stage, ...] = (
    Stage("resolve", after=(), run=stage_resolve, stored=False),
    Stage("plan", after=("resolve",), run=stage_plan, stored=False),
    Stage("load", after=("plan",), run=stage_load),  # after plan: a recipe the target refuses reads no weights
    Stage("quantize", after=("plan", "load"), run=stage_quantize, stored=False, lazy=True,
          materialise=quantize_model),
    Stage("export", after=("resolve", "quantize"), run=stage_export, lazy=True, materialise=export_programs),
    Stage("lower", after=("plan", "load", "quantize", "export"), run=stage_lower),  # quantize: the weights
    Stage("build", after=("plan", "lower"), run=stage_build),
    Stage("validate", after=("resolve", "plan", "load", "quantize", "build"), run=stage_validate),
    Stage("package", after=("resolve", "plan", "load", "build", "validate"), run=stage_package),
)


# ---- --from-bundle: finish a `--until lower` bundle on a machine with the target's toolchain ------------------
def build_from_bundle(bundle: Path, out_dir: Path) -> Path:
    """Build the engine of a bundle artifact (e.g. TensorRT `.plan`s on an NVIDIA machine) into `out_dir`.
    The bundle is read-only input; the new artifact is staged beside `out_dir` and renamed into place."""
    from dsv4c.artifact import ArtifactError, read_manifest, write_manifest
    from dsv4c.compiler.errors import RecipeError
    from dsv4c.compiler.recipe import load_recipe
    from dsv4c.targets.base import ToolchainMissing, get_target

    bundle = Path(bundle)
    try:
        manifest = read_manifest(bundle, verify=True)
    except ArtifactError as e:
        raise RecipeError(f"--from-bundle {bundle}: {e}") from e
    if manifest.data.get("kind") != "bundle":
        raise RecipeError(f"--from-bundle {bundle}: manifest kind is {manifest.data.get('kind')!r}, not 'bundle' "
                          "(make one with `dsv4c build RECIPE --until lower`)")
    recipe = load_recipe(bundle / "recipe.lock.yaml")
    with staged_output(out_dir) as staged:
        shutil.copytree(bundle, staged, ignore=shutil.ignore_patterns("engine", "manifest.json"), dirs_exist_ok=True)
        (staged / "engine").mkdir()
        try:
            build_engine(get_target(manifest.target), bundle / "engine", staged / "engine", recipe)
        except ToolchainMissing as e:
            raise ToolchainError(str(e)) from e
        data = {k: v for k, v in manifest.data.items() if k not in ("schema_version", "outputs")}
        data.update(kind="engine", engine=json.loads((staged / "engine" / "engine.json").read_text()),
                    built_from_bundle={"path": str(bundle), "outputs": manifest.data["outputs"]},
                    validation=None, validation_note="engine built from a bundle: numerics were checked by "
                    "emulating the bundle (Engine.load(bundle, emulate=True)); run the engine against it on this "
                    "machine")
        write_manifest(staged, data)
    return out_dir
