"""The TensorRT target.

    check:  the recipe's formats on the exact SM (sm_100: FP4 experts native; sm_90: no FP4 tensor cores, so the
            experts need the recipe's declared fallback: lossless FP4->FP8 transcode), the local toolchain
            (tensorrt importable? GPU present?). The layout against the model's shapes is plan's (layout_problems).
    lower:  exported programs -> ONNX opset 22 (what TensorRT 10.8+ and 11 parse) where every V4 op is a `dsv4`
            node carrying `plugin_namespace="dsv4"` / `plugin_version="1"`: TensorRT's ONNX parser maps such a node
            to the plugin `dsv4::<op type>` registered by dsv4c.targets.tensorrt.plugins (Triton kernels). Weights
            stay packed (FP8 bits / FP4 nibbles as uint8 initializers in `<program>.onnx.data`). No function
            bodies: the parser must meet the plugins, not inline a portable body. On a mesh (meta["mesh"], one call
            per rank into bundle_dir/rank<r>) the rank's program keeps its `dsv4::AllReduce` / `AllGather` nodes
            (no plugins) and bundle.json records the mesh, the rank and each collective's group of global ranks.
    build:  where TensorRT and a GPU exist, one serialized engine (`.plan`) per program, with optimization
            profiles for the dynamic batch / prompt length and a persisted timing cache; a rank's collectives are
            spliced into the parsed network as IDistCollectiveLayers (collectives.py); else ToolchainMissing
            (exit 4), and `dsv4c build --until lower` leaves the relocatable bundle that `--from-bundle` finishes.

What runs here: lower, the structural checks (operator list, plugin coverage) and the emulation of the exact
bundle on ONNX Runtime (executor.py). What cannot: engine build and TensorRT execution (no TensorRT on the
machines dsv4c is developed on).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import onnx
from onnx import helper

from dsv4c.graphs.ops.onnx import DOMAIN
from dsv4c.targets.base import TargetCheck, ToolchainMissing

OPSET = 22  # TensorRT 10.x parses opsets 9..22, TensorRT 11.x up to 25: 22 serves both
PLUGIN_NAMESPACE, PLUGIN_VERSION = DOMAIN, "1"
SUPPORTED_OPS_FILE = Path(__file__).with_name("trt_onnx_ops.txt")
# What each SM runs natively, per quantization group (None: any value the recipe schema allows).
NATIVE = {"sm_90": {"experts": ("fp8",), "dense": ("fp8",)},
          "sm_100": {"experts": ("fp4", "fp8"), "dense": ("fp8",)}}
IMPLEMENTED_FALLBACKS = {"experts": ("fp8",)}  # lossless FP4->FP8 transcode (checked bit-exact at load)
WORKSPACE_BYTES = 8 << 30


class TensorRTTarget:
    kind = "tensorrt"
    # the bundle ships each weight once (decode refers to prefill's); each serialized .plan embeds its own
    weight_copies = {"lower_bundle": 1, "build_engine": 2, "artifact": 2}
    engine_links_bundle = False  # the engine is new files (one .plan per program) compiled from the bundle
    scale_bytes = 1  # weight scales as the checkpoint's e8m0 bytes, read by the plugins' kernels (e8m0_scales)

    def cache_copies(self, field: str) -> int:
        # an engine's outputs may not alias its inputs: the runtime reads one set of caches and has the step
        # write the other (executor.TensorRTExecutor, device_cache.TorchCache(double_buffered=True))
        return 2

    def session_state(self, layers: int) -> int:
        return 0  # the execution contexts' device memory is not modelled (TensorRT reports it after the build)

    def kernel_scratch(self, op: str, args: tuple) -> int:
        """What the JIT plugins' launchers allocate beside their outputs (kernels/moe.py, kernels/indexer.py)."""
        if op == "moe_experts":  # every pick's h row and its output row before the sum over slots
            x, indices, w1 = args[0], args[2], args[3]
            return 4 * indices.numel() * (x.shape[-1] + w1.shape[1])
        if op == "indexer_topk":  # an int64 sort key per visible entry and query
            q, k = args[0], args[1]
            return 8 * q.shape[0] * q.shape[1] * k.shape[1]
        return 0

    def check(self, recipe: Any) -> TargetCheck:
        check = TargetCheck(toolchain=toolchain())
        t, q = recipe.target, recipe.quantization
        for group, native in NATIVE[t.arch].items():
            wanted = getattr(q, group)
            if wanted in native:
                continue
            if q.on_unsupported != "fallback":
                check.problems.append(f"quantization.{group}={wanted!r} has no {t.arch} kernel; set "
                                      f"quantization.on_unsupported: fallback (with fallback.{group}: "
                                      f"{native[0]}) or choose {' / '.join(native)}")
                continue
            to = q.fallback_for(group) or IMPLEMENTED_FALLBACKS.get(group, (None,))[0]
            if to not in IMPLEMENTED_FALLBACKS.get(group, ()):
                check.problems.append(f"quantization.fallback.{group}={to!r} is not implemented by the TensorRT "
                                      f"target (implemented: {', '.join(IMPLEMENTED_FALLBACKS.get(group, ()))})")
                continue
            check.fallbacks.append({"group": group, "from": wanted, "to": to,
                                    "reason": f"{t.arch} has no {wanted} tensor-core path; lossless transcode"})
        return check

    def lower(self, programs: dict[str, Any], bundle_dir: Path, recipe: Any, meta: dict[str, Any],
              weights: Callable[[str], Any] | None = None) -> None:
        from dsv4c.targets.e8m0_scales import store_scales_e8m0
        from dsv4c.targets.onnx_bundle import custom_nodes, export_bundle_programs

        from dsv4c.targets.tensorrt.collectives import COLLECTIVES, collective_nodes, mesh_groups

        bundle_dir.mkdir(parents=True, exist_ok=True)
        # the bundle ships each weight once; the parser follows each initializer's location. Weight scales stay
        # the checkpoint's e8m0 bytes, which the plugins read (a decode in the graph would be constant-folded by
        # the engine build into float32 scales: FP4 experts' 1x32 scales would weigh 4 bytes instead of 1)
        files = export_bundle_programs(programs, bundle_dir, OPSET, hook=plugin_nodes, weights=weights, share=True,
                                       rewrite=store_scales_e8m0)
        _copy_plugin_sources(bundle_dir / "plugins")
        rt = recipe.runtime
        models = {p: onnx.load(bundle_dir / f, load_external_data=False) for p, f in files.items()}
        mesh, rank = meta.get("mesh"), meta.get("rank", 0)
        collectives = {p: [{"node": n.name, "op": n.op_type,
                            **{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}}
                           for n in collective_nodes(m)] for p, m in models.items()}
        if any(collectives.values()) and not mesh:
            raise ValueError("the programs hold collectives (a mesh rank's model) but meta names no mesh")
        extra = {}
        if mesh:  # the groups this rank's IDistCollectiveLayers span, by global rank (parallel.Shard)
            extra = {"mesh": mesh, "rank": rank, "collectives": collectives,
                     "groups": {str(g): r for g, r in mesh_groups(mesh, rank).items()},
                     "communicator": "NCCL, world of the mesh (IExecutionContext.set_communicator)"}
        (bundle_dir / "bundle.json").write_text(json.dumps({
            **meta, "format": "onnx", "opset": OPSET, "programs": files,
            "arch": recipe.target.arch,
            "plugins": sorted({f"{PLUGIN_NAMESPACE}::{n.op_type}" for m in models.values()
                               for n in custom_nodes(m, DOMAIN) if n.op_type not in COLLECTIVES}),
            "profiles": profiles(rt.max_batch_size, rt.max_seq_len),
            "build_command": "dsv4c build --from-bundle .",
            **extra,
        }, indent=2))

    def missing_build_toolchain(self) -> str | None:
        """Why `build` would stop with ToolchainMissing here (None when it would not): the pipeline asks before
        spending minutes on export and lowering."""
        have = toolchain()
        if have["tensorrt"] == "missing" or have["cuda_device"] == "missing":
            return (f"TensorRT engine build needs the `tensorrt` Python package (10.9+) and an NVIDIA GPU; here: "
                    f"tensorrt {have['tensorrt']}, GPU {have['cuda_device']}. Run `dsv4c build RECIPE --until lower` "
                    "for a relocatable bundle and `dsv4c build --from-bundle DIR` on a TensorRT machine")
        return None

    def build(self, bundle_dir: Path, engine_dir: Path, recipe: Any) -> None:
        missing = self.missing_build_toolchain()
        if missing:
            raise ToolchainMissing(missing)
        have = toolchain()
        meta = json.loads((bundle_dir / "bundle.json").read_text())
        engine_dir.mkdir(parents=True, exist_ok=True)  # a mesh rank's engines go to their own rank<r> directory
        flags = build_engines(bundle_dir, engine_dir, meta)
        meta.update(format="tensorrt", plans={p: f"{p}.plan" for p in meta["programs"]}, builder=flags,
                    toolchain=have)
        (engine_dir / "engine.json").write_text(json.dumps(meta, indent=2))


def toolchain() -> dict[str, str]:
    """tensorrt version and the CUDA device name, "missing" for each that is absent."""
    try:
        import tensorrt as trt

        version = trt.__version__
    except Exception:  # ImportError, or the bindings wheel without libnvinfer
        version = "missing"
    try:
        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "missing"
    except Exception:
        device = "missing"
    return {"tensorrt": version, "cuda_device": device}


def plugin_nodes(model: onnx.ModelProto) -> None:
    """The bundle's dsv4 nodes as TensorRT's parser meets them: plugin attributes (mark_plugins), weight scales
    read as e8m0 bytes (their decode folded away: the plugins' kernels decode them)."""
    from dsv4c.targets.e8m0_scales import fold_e8m0_decodes

    mark_plugins(model)
    fold_e8m0_decodes(model.graph)


def emulation_nodes(model: onnx.ModelProto) -> None:
    """The inverse of plugin_nodes, for emulation on ONNX Runtime: the ops' function bodies declare only their
    own attributes and take float scales."""
    from dsv4c.targets.e8m0_scales import decode_e8m0_scales

    unmark_plugins(model)
    decode_e8m0_scales(model.graph)


def mark_plugins(model: onnx.ModelProto) -> None:
    """Give each dsv4 node the attributes TensorRT's ONNX parser uses to find its plugin creator
    (op type = plugin name, `plugin_namespace`, `plugin_version`); the collectives are no plugins (the engine
    build replaces them by TensorRT layers) and keep only their own attributes."""
    from dsv4c.targets.tensorrt.collectives import COLLECTIVES

    for node in model.graph.node:
        if node.domain == DOMAIN and node.op_type not in COLLECTIVES:
            names = {a.name for a in node.attribute}
            if "plugin_namespace" not in names:
                node.attribute.append(helper.make_attribute("plugin_namespace", PLUGIN_NAMESPACE))
            if "plugin_version" not in names:
                node.attribute.append(helper.make_attribute("plugin_version", PLUGIN_VERSION))


def unmark_plugins(model: onnx.ModelProto) -> None:
    """The inverse of mark_plugins, for emulation: the function bodies declare only the ops' own attributes."""
    for node in model.graph.node:
        if node.domain == DOMAIN:
            keep = [a for a in node.attribute if a.name not in ("plugin_namespace", "plugin_version")]
            del node.attribute[:]
            node.attribute.extend(keep)


def profiles(max_batch: int, max_seq_len: int) -> dict[str, dict[str, list[int]]]:
    """Optimization-profile ranges of the dynamic dims: batch for both programs, prompt length for prefill."""
    opt_batch = max(1, min(max_batch, 8))
    return {"prefill": {"batch": [1, opt_batch, max_batch], "seq": [2, min(512, max_seq_len), max_seq_len]},
            "decode": {"batch": [1, opt_batch, max_batch], "seq": [1, 1, 1]}}


def build_engines(bundle_dir: Path, engine_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Parse each program's ONNX and serialize a `.plan` (TensorRT Python API); a mesh rank's programs are parsed
    in their cut form and get their collectives back as IDistCollectiveLayers (collectives.py). Returns the
    builder flags used. Not executable on machines without TensorRT (see README 'TensorRT')."""
    import tensorrt as trt

    from dsv4c.targets.tensorrt import plugins
    from dsv4c.targets.tensorrt.collectives import cut_collectives, splice_collectives

    plugins.register_all()
    logger = trt.Logger(trt.Logger.WARNING)
    cache_file = bundle_dir / "timing.cache"
    network_flags = _network_flags(trt)
    flags = {"network": "|".join(network_flags), "workspace_bytes": WORKSPACE_BYTES, "timing_cache": cache_file.name,
             "tensorrt": trt.__version__}
    mesh = meta.get("mesh")
    groups = {int(g): r for g, r in meta.get("groups", {}).items()}
    for program, rel in meta["programs"].items():
        builder = trt.Builder(logger)
        # strongly typed: the ONNX dtypes (uint8 packed weights, f32 activations, bf16 rounding inside plugins)
        # are the numerics; TensorRT must not pick its own precisions
        network = builder.create_network(sum(1 << int(f) for f in network_flags.values()))
        parser = trt.OnnxParser(network, logger)
        path, cuts = bundle_dir / rel, []
        if mesh:
            model = onnx.load(path, load_external_data=False)
            cuts = cut_collectives(model, {g: len(r) for g, r in groups.items()})
            # parsed from memory: `path` tells the parser where the external weights are, and the bundle (possibly
            # the read-only stage cache) is not written to
            parsed = parser.parse(model.SerializeToString(), str(path))
        else:
            parsed = parser.parse_from_file(str(path))
        if not parsed:
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {rel}: {errors}")
        splice_collectives(trt, network, cuts, groups)
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        if cuts and hasattr(trt.PreviewFeature, "MULTIDEVICE_RUNTIME_10_16"):
            # TensorRT 10.16 keeps the multi-device runtime behind this preview flag (general in 11)
            config.set_preview_feature(trt.PreviewFeature.MULTIDEVICE_RUNTIME_10_16, True)
            flags["preview"] = "MULTIDEVICE_RUNTIME_10_16"
        cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        config.add_optimization_profile(_profile(builder, network, meta["profiles"][program], meta["cache"]))
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise RuntimeError(f"TensorRT failed to build {rel} (see the log above)")
        (engine_dir / f"{program}.plan").write_bytes(bytes(plan))
        cache_file.write_bytes(bytes(config.get_timing_cache().serialize()))
        shutil.copy(cache_file, engine_dir / cache_file.name)
    return flags


def _network_flags(trt) -> dict[str, Any]:
    """{name: NetworkDefinitionCreationFlag} to set: STRONGLY_TYPED, plus PREFER_AOT_PYTHON_PLUGINS (TensorRT
    10.9+) so the ops that have both a PTX (aot_impl) and a Python launcher (impl) are built with the PTX: the
    engine then runs without Python. Ops with only a JIT impl (indexer_topk, moe_experts) still need Python +
    torch at run time (see plugins.py). The manifest records the names actually set."""
    kinds = trt.NetworkDefinitionCreationFlag
    names = ["STRONGLY_TYPED"] + (["PREFER_AOT_PYTHON_PLUGINS"] if hasattr(kinds, "PREFER_AOT_PYTHON_PLUGINS") else [])
    return {name: getattr(kinds, name) for name in names}


def _profile(builder, network, ranges: dict[str, list[int]], cache: list[dict[str, Any]]):
    """Inputs are positional: tokens [B, S], start_pos [B], n_valid [B], then the cache tensors [B, *shape]."""
    profile = builder.create_optimization_profile()
    b, s = ranges["batch"], ranges["seq"]
    shapes = [[(b[i], s[i]) for i in range(3)], [(b[i],) for i in range(3)], [(b[i],) for i in range(3)]]
    shapes += [[(b[i], *c["shape"]) for i in range(3)] for c in cache]
    for i, (lo, opt, hi) in enumerate(shapes):
        profile.set_shape(network.get_input(i).name, lo, opt, hi)
    return profile


def _copy_plugin_sources(dest: Path) -> None:
    """The plugin registrations and Triton kernels travel with the bundle (they are also in dsv4c itself)."""
    here = Path(__file__).parent
    dest.mkdir(parents=True, exist_ok=True)
    if (here / "plugins.py").is_file():
        shutil.copy(here / "plugins.py", dest / "plugins.py")
    if (here / "kernels").is_dir():
        shutil.copytree(here / "kernels", dest / "kernels", ignore=shutil.ignore_patterns("__pycache__"),
                        dirs_exist_ok=True)
