"""The stages of `dsv4c build`, in order. Each reads what earlier stages left in `build.state`, sets its key
in `build.keys` and returns "cached" when it reused a stored result."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

import dsv4c
from dsv4c.compiler.errors import CheckpointInvalidError, InfeasibleError, ToolchainError, ValidationGateError
from dsv4c.compiler.pipeline import Build, digest, toolchain_versions


# ---- resolve: the recipe, fully resolved ----------------------------------------------------------------------
def stage_resolve(build: Build) -> None:
    build.state["lock"] = build.recipe.lock_yaml()
    build.state["toolchain"] = toolchain_versions()
    build.keys["resolve"] = build.recipe.digest()


# ---- plan: can the target build this recipe here? -----------------------------------------------------------
def stage_plan(build: Build) -> None:
    from dsv4c.targets.base import get_target

    target = get_target(build.recipe.target.kind)
    check = target.check(build.recipe)
    if check.problems:
        raise InfeasibleError(f"recipe {build.recipe.name!r} cannot be built for target "
                              f"{build.recipe.target.kind!r}: " + "; ".join(check.problems))
    build.state.update(target=target, check=check)
    build.state["toolchain"].update(check.toolchain)
    build.keys["plan"] = digest(build.keys["resolve"], check.fallbacks, check.toolchain)


# ---- load: locate (or synthesise) and verify the official-format checkpoint ----------------------------------
def stage_load(build: Build) -> str | None:
    from dsv4c.graphs.checkpoint import CheckpointError, CheckpointReader, write_synthetic_checkpoint
    from dsv4c.graphs.config import preset

    model = build.recipe.model
    status = None
    if model.synthetic is not None:
        key = digest("synthetic", model.synthetic.preset, model.synthetic.seed, dsv4c.__version__)
        path = build.cached_dir("load", key)
        if path is None:
            cfg = preset(model.synthetic.preset)
            path = build.store_dir("load", key, lambda d: write_synthetic_checkpoint(
                d / "checkpoint", cfg, seed=model.synthetic.seed, tokenizer_dir=_synthetic_tokenizer()))
        else:
            status = "cached"
        path = path / "checkpoint"
    else:
        path = Path(model.checkpoint)
    try:
        reader = CheckpointReader(path)
        reader.verify()
    except CheckpointError as e:
        raise CheckpointInvalidError(str(e)) from e
    index = path / "model.safetensors.index.json"
    fingerprint = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.glob("*.safetensors"))]
    build.state.update(checkpoint=path, reader=reader)
    build.keys["load"] = digest(str(path), fingerprint, index.read_text() if index.is_file() else None)
    return status


def _synthetic_tokenizer() -> Path | None:
    try:
        from dsv4c.runtime.tokenizer import synthetic_tokenizer_dir
    except ImportError:
        return None
    return synthetic_tokenizer_dir()


# ---- quantize: the model in the engine's weight formats (lazy: only when a later stage needs it) -------------
def numerics_for(recipe):
    from dsv4c.graphs.model import Numerics

    q = recipe.quantization
    return Numerics(act_quant=q.activations == "fp8", kv_fp8=q.kv_cache == "fp8", indexer_fp4=q.indexer == "fp4",
                    bf16=not (q.activations == "none" and q.kv_cache == "bf16" and q.indexer == "bf16"))


def expert_format_for(build: Build) -> str:
    fallback = {f["group"]: f["to"] for f in build.state["check"].fallbacks}
    return fallback.get("routed_experts", build.recipe.quantization.experts)


def stage_quantize(build: Build) -> None:
    build.keys["quantize"] = digest(build.keys["load"], build.recipe.digest("quantization"),
                                    expert_format_for(build))


def reference_model(build: Build):
    """The PyTorch model with the checkpoint's weights in the engine's formats (built on first use)."""
    if "model" not in build.state:
        from dsv4c.graphs.model import DeepseekV4, load_official

        reader = build.state["reader"]
        fmt = {"fp4": "fp4", "fp8": "fp8"}.get(expert_format_for(build))
        if fmt is None:
            raise InfeasibleError(f"routed expert format {expert_format_for(build)!r} is not implemented by the "
                                  "CPU engine yet; use experts: fp4 or fp8")
        model = DeepseekV4(reader.config, numerics_for(build.recipe), expert_format=fmt)
        load_official(model, reader.read_globals())
        for _, tensors in reader.iter_layers():
            load_official(model, tensors)
        build.state["model"] = model.eval()
    return build.state["model"]


# ---- export: torch.export of the prefill and decode programs (lazy) -------------------------------------------
def stage_export(build: Build) -> None:
    rt = build.recipe.runtime
    build.keys["export"] = digest(build.keys["quantize"], rt.max_batch_size, rt.max_seq_len,
                                  build.state["toolchain"]["torch"])


def exported_programs(build: Build) -> dict:
    if "programs" not in build.state:
        from dsv4c.compiler.export import PROGRAMS, export_program

        rt, model = build.recipe.runtime, reference_model(build)
        build.state["programs"] = {p: export_program(model, p, rt.max_batch_size, rt.max_seq_len) for p in PROGRAMS}
    return build.state["programs"]


def engine_meta(build: Build) -> dict:
    model, rt = reference_model(build), build.recipe.runtime
    return {"cache": [{"name": e.name, "shape": list(e.shape[1:]), "fill": e.fill}
                      for e in model.cache_spec(1, rt.max_seq_len)],
            "vocab_size": model.cfg.vocab_size, "eos_token_id": model.cfg.eos_token_id,
            "expert_format": model.expert_format, "numerics": vars(model.numerics)}


# ---- lower: exported programs -> the target's bundle ----------------------------------------------------------
def stage_lower(build: Build) -> str | None:
    key = digest(build.keys["export"], build.recipe.digest("target"), build.state["toolchain"])
    build.keys["lower"] = key
    path = build.cached_dir("lower", key)
    status = "cached" if path else None
    if path is None:
        path = build.store_dir("lower", key, lambda d: build.state["target"].lower(
            exported_programs(build), d, build.recipe, engine_meta(build)))
    build.state["bundle"] = path
    return status


# ---- build: bundle -> engine files ------------------------------------------------------------------------------
def stage_build(build: Build) -> str | None:
    from dsv4c.targets.base import ToolchainMissing

    key = digest(build.keys["lower"], build.state["toolchain"])
    build.keys["build"] = key
    path = build.cached_dir("build", key)
    status = "cached" if path else None
    if path is None:
        try:
            path = build.store_dir("build", key, lambda d: build.state["target"].build(build.state["bundle"], d,
                                                                                       build.recipe))
        except ToolchainMissing as e:
            raise ToolchainError(str(e)) from e
    build.state["engine_dir"] = path
    build.state["engine_info"] = json.loads((path / "engine.json").read_text())
    return status


# ---- validate: the built engine against the PyTorch reference -------------------------------------------------
def stage_validate(build: Build) -> str | None:
    v = build.recipe.validate
    key = digest(build.keys["build"], build.recipe.digest("validate"))
    build.keys["validate"] = key
    path = build.cached_dir("validate", key)
    if path is not None:
        build.state["validation"] = json.loads((path / "validation.json").read_text())
        return "cached"
    staging = _assemble(build, Path(build.out_dir.parent) / f".{build.out_dir.name}.validate", validation=None)
    try:
        report = validate_engine(staging, reference_model(build), v)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not report["passed"]:
        kept = build.cache_dir / "failed-validation" / f"{build.recipe.name}-{key}.json"
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_text(json.dumps(report, indent=2))
        raise ValidationGateError(f"engine does not match the PyTorch reference: {report['summary']} "
                                  f"(report kept at {kept})")
    build.store_dir("validate", key, lambda d: (d / "validation.json").write_text(json.dumps(report, indent=2)))
    build.state["validation"] = report
    return None


def validate_engine(artifact: Path, model, v) -> dict:
    """Seeded prompts of unequal lengths: prefill + `decode_steps` teacher-forced decode steps on the engine
    and on the PyTorch reference; per step logit cosine, top-1 agreement and KL(ref || engine)."""
    from dsv4c.runtime.engine import Engine

    engine = Engine.load(artifact)
    gen = torch.Generator().manual_seed(v.seed)
    lengths = [max(2, v.prompt_len - 3 * i) for i in range(v.prompts)]
    prompts = [torch.randint(2, model.cfg.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    session = engine.session(len(prompts))
    cache = model.new_cache(len(prompts), engine.max_seq_len)
    batch = torch.zeros(len(prompts), max(lengths), dtype=torch.long)
    for b, p in enumerate(prompts):
        batch[b, : len(p)] = torch.tensor(p)
    start, n_valid = torch.zeros(len(prompts), dtype=torch.long), torch.tensor(lengths)
    steps = []
    with torch.no_grad():
        ref, cache = model(batch, start, n_valid, cache)
        got = session.prefill(prompts)
        steps.append(_compare(ref.numpy(), got))
        pos = n_valid.clone()
        for _ in range(v.decode_steps):
            nxt = ref.argmax(-1)  # teacher forcing with the reference's greedy tokens
            ref, cache = model(nxt[:, None], pos, torch.ones_like(pos), cache)
            got = session.decode(nxt.numpy())
            steps.append(_compare(ref.numpy(), got))
            pos += 1
    min_cos = min(s["min_cosine"] for s in steps)
    top1 = all(s["top1_equal"] for s in steps)
    max_kl = max(s["max_kl"] for s in steps)
    passed = min_cos >= v.min_cosine and (top1 or not v.require_top1) and max_kl <= v.max_kl
    return {"passed": passed, "prompts": lengths, "decode_steps": v.decode_steps,
            "min_cosine": min_cos, "top1_equal": top1, "max_kl": max_kl,
            "thresholds": {"min_cosine": v.min_cosine, "require_top1": v.require_top1, "max_kl": v.max_kl},
            "summary": f"min cosine {min_cos:.6f}, top-1 {'equal' if top1 else 'differs'}, max KL {max_kl:.2e}",
            "steps": steps}


def _compare(ref: np.ndarray, got: np.ndarray) -> dict:
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    cos = (ref * got).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1))
    lp, lq = _log_softmax(ref), _log_softmax(got)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return {"min_cosine": float(cos.min()), "top1_equal": bool((ref.argmax(-1) == got.argmax(-1)).all()),
            "max_kl": float(kl.max())}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ---- package: the artifact directory, written atomically ------------------------------------------------------
def stage_package(build: Build) -> None:
    out = build.out_dir
    tmp = _assemble(build, out.parent / f".{out.name}.tmp", validation=build.state["validation"])
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    build.state["artifact"] = out
    build.keys["package"] = digest(build.keys["validate"])


def _assemble(build: Build, root: Path, validation: dict | None) -> Path:
    """Lay out an artifact in `root` (manifest last)."""
    from dsv4c.artifact import write_manifest

    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    shutil.copytree(build.state["engine_dir"], root / "engine", ignore=shutil.ignore_patterns(".complete"))
    ckpt = build.state["checkpoint"]
    shutil.copy(ckpt / "config.json", root / "config.json")
    if (ckpt / "tokenizer.json").is_file():
        (root / "tokenizer").mkdir()
        for f in ("tokenizer.json", "tokenizer_config.json"):
            if (ckpt / f).is_file():
                shutil.copy(ckpt / f, root / "tokenizer" / f)
    (root / "recipe.lock.yaml").write_text(build.state["lock"])
    if validation is not None:
        (root / "validation.json").write_text(json.dumps(validation, indent=2))
    r, info = build.recipe, build.state["engine_info"]
    write_manifest(root, {
        "dsv4c_version": dsv4c.__version__,
        "name": r.name,
        "recipe_sha256": build.keys["resolve"],
        "target": {"kind": r.target.kind},
        "runtime": {"max_batch_size": r.runtime.max_batch_size, "max_seq_len": r.runtime.max_seq_len},
        "engine": info,
        "toolchain": build.state["toolchain"],
        "fallbacks": build.state["check"].fallbacks,
        "stage_keys": build.keys,
        "inputs": {"checkpoint": str(ckpt), "checkpoint_key": build.keys["load"]},
        "validation": None if validation is None else {k: validation[k] for k in
                                                       ("passed", "min_cosine", "top1_equal", "max_kl")},
    })
    return root
