"""The CPU target: an ONNX Runtime engine.

    lower:  each exported program -> `<program>.onnx` (+ `<program>.onnx.data`, weights kept packed: FP8 bits and
            FP4 nibbles stay uint8 initializers), V4 ops as `dsv4` domain nodes each carrying its ONNX function
            body, so the bundle runs on any ONNX Runtime.
    build:  the bundle + the dsv4 C++ kernel library (dsv4c.targets.cpu.kernels) when a C++ toolchain and the
            ORT headers are present, with the library's graph passes run on the programs (dsv4c.targets.cpu.passes);
            without it ORT inlines the function bodies (correct, slower) and the manifest records that fallback.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

from dsv4c.targets.base import TargetCheck

SUPPORTED = {"experts": ("fp4", "fp8"), "dense": ("fp8",), "activations": ("fp8", "none"),
             "kv_cache": ("fp8", "bf16"), "indexer": ("fp4", "bf16")}
KERNELS_FILE = "libdsv4_ops.so"  # the executor looks for this name in the engine dir
GRAPH_PASSES = "fold-bf16-roundings-1,e8m0-scales-1"  # the build stage's key: a change to cpu.passes bumps it


class CpuTarget:
    kind = "cpu"
    weight_copies = {"lower_bundle": 1, "build_engine": 1, "artifact": 1}  # decode reads prefill.onnx.data
    engine_links_bundle = True  # the engine's weight files are hard links to the bundle's (dsv4c.files)
    scale_bytes = 1  # weight scales as the checkpoint's e8m0 bytes (targets.e8m0_scales)

    def cache_copies(self, field: str) -> int:
        # the executor binds the compressed entries' and indexer keys' outputs to their inputs (updated in place);
        # a step writes the window ring and the compressor state into spare buffers (executor.updated_in_place)
        return 1 if field in ("cmp", "idx") else 2

    def session_state(self, layers: int) -> int:
        """What loading the engine adds to a process that has imported ONNX Runtime: the sessions of the prefill
        and decode programs, ~5.65 KB per graph node and ~600 nodes per layer (the two programs), and ~35 MB that
        do not grow with depth (the runtime's imports, onnx among them; ORT's and the kernel library's code pages;
        the sessions' own). Measured at mini-1b's width, a process's growth on Engine.load (nothing run):
        43.1 / 49.8 / 63.3 MB at 2 / 4 / 8 layers (1363 / 2554 / 4936 nodes). The node count does not depend on
        the width; that the bytes per node do not either is measured only at mini-1b's."""
        return int(35.4e6 + 600 * 5.65e3 * layers)

    def kernel_scratch(self, op: str, args: tuple) -> int:
        """The large Scratch blocks of the kernel library's ops (ops.cc), at their most at once; the small ones
        (picks, job lists, per-thread rows) are left out. tests/test_ort_kernels.py holds it against the library's
        own count (dsv4_scratch_high_water)."""
        f32 = 4
        if op == "moe_experts":
            # before the down projection: every pick's x row, gate, up and h as float32, its x row laid out again
            # as bf16 for the matrix tiles (at most 16 rows of padding per expert) and the pick lists
            x, indices, w1 = args[0], args[2], args[3]
            picks, hidden, inter, experts = indices.numel(), x.shape[-1], w1.shape[1], w1.shape[0]
            return picks * (f32 * (hidden + 3 * inter) + 16) + 2 * hidden * (picks + 16 * experts)
        if op in ("fp8_linear", "fp8_grouped_linear"):  # x quantised to FP8 values first
            return f32 * args[0].numel() if args[3] else 0
        if op == "sparse_attn":  # packed rows unpacked as bf16: every kv / cmp row once, or each query's picks
            q, kv, cmp, idx = args[0], args[1], args[2], args[4]
            if str(kv.dtype) != "torch.uint8":  # float rows are read as they are
                return 0
            b, s, _, d = q.shape
            rows, picks = kv.shape[1] + cmp.shape[1], s * idx.shape[-1]
            bf16 = 2  # float32 for a call whose rows bf16 cannot hold (block scales below 2^-124), which the
            # model's packing never writes: its amax floor keeps them at 2^-22 or more
            return bf16 * b * d * rows if rows <= picks else (bf16 * d + 8) * b * picks
        if op == "indexer_topk":  # every visible entry's score, per query
            q, k = args[0], args[1]
            return f32 * q.shape[0] * q.shape[1] * k.shape[1]
        return 0

    def check(self, recipe: Any) -> TargetCheck:
        import onnxruntime

        check = TargetCheck(toolchain={"onnxruntime": onnxruntime.__version__, "dsv4_kernels": _kernels_key(),
                                       "graph_passes": GRAPH_PASSES})
        q = recipe.quantization
        for group, allowed in SUPPORTED.items():
            value = getattr(q, group)
            if value not in allowed:
                check.problems.append(f"quantization.{group}={value!r} is not supported on cpu "
                                      f"(supported: {', '.join(allowed)})")
        return check

    def lower(self, programs: dict[str, Any], bundle_dir: Path, recipe: Any, meta: dict[str, Any],
              weights: Callable[[str], Any] | None = None) -> None:
        from dsv4c.graphs.ops.onnx import ONNX_OPSET
        from dsv4c.targets.e8m0_scales import store_scales_e8m0
        from dsv4c.targets.onnx_bundle import export_bundle_programs

        # with the function bodies (portable); decode reads prefill's weights: one copy on disk and in the page cache;
        # weight scales as the checkpoint's e8m0 bytes, decoded in the graph (the build lets the kernels read them)
        files = export_bundle_programs(programs, bundle_dir, ONNX_OPSET, weights=weights, share=True,
                                       rewrite=store_scales_e8m0)
        (bundle_dir / "bundle.json").write_text(json.dumps(
            {**meta, "format": "onnx", "opset": ONNX_OPSET, "programs": files}, indent=2))

    def build(self, bundle_dir: Path, engine_dir: Path, recipe: Any) -> None:
        from dsv4c.files import link_tree

        meta = json.loads((bundle_dir / "bundle.json").read_text())
        # the engine runs the bundle's files as they are: hard links, not a second copy of the weights
        link_tree(bundle_dir, engine_dir, skip=("bundle.json", ".complete"))
        meta["kernels"] = _install_kernels(engine_dir)
        if meta["kernels"]["implementation"] == "cpp":
            meta["graph_passes"] = _fold_programs(engine_dir, meta["programs"])
        (engine_dir / "engine.json").write_text(json.dumps(meta, indent=2))


def _fold_programs(engine_dir: Path, programs: dict[str, str]) -> dict[str, dict[str, int]]:
    """Run the kernel library's graph passes (dsv4c.targets.cpu.passes) on the engine's programs. Each graph file
    is written anew (its hard link to the bundle's is replaced, the weights' links stay): -> folds per pass and
    program."""
    import os

    import onnx

    from dsv4c.targets.cpu.passes import fold_bf16_roundings
    from dsv4c.targets.e8m0_scales import fold_e8m0_decodes

    folded: dict[str, dict[str, int]] = {"bf16_roundings_folded": {}, "e8m0_decodes_folded": {}}
    for name, rel in programs.items():
        path = engine_dir / rel
        model = onnx.load(str(path), load_external_data=False)
        folded["bf16_roundings_folded"][name] = fold_bf16_roundings(model.graph)
        folded["e8m0_decodes_folded"][name] = fold_e8m0_decodes(model.graph)
        tmp = path.with_name(path.name + ".tmp")
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    return folded


def _kernels_key() -> str:
    """Content hash of the C++ kernel sources (part of the build stage's key), "absent" without them."""
    try:
        from dsv4c.targets.cpu.kernels.build import build_key
    except ImportError:
        return "absent"
    return build_key()


def _install_kernels(engine_dir: Path) -> dict[str, str]:
    """Copy the dsv4 C++ kernel library into the engine, building it if needed; on a machine without a C++
    toolchain or ORT headers, say so and let the function bodies run (recorded, never silent)."""
    from dsv4c.targets.base import ToolchainMissing

    try:
        from dsv4c.targets.cpu.kernels.build import KernelBuildError, build_key, build_library, kernel_isa
    except ImportError as e:  # the kernels package is absent from this install
        return {"implementation": "onnx-function-bodies", "reason": f"kernel sources unavailable: {e}"}
    try:
        library = build_library()
    except (ToolchainMissing, KernelBuildError) as e:  # a compile failure falls back too, and says why
        return {"implementation": "onnx-function-bodies", "reason": str(e)}
    shutil.copy(library, engine_dir / KERNELS_FILE)
    return {"implementation": "cpp", "library": KERNELS_FILE, "sources_key": build_key(),
            "isa_at_build": kernel_isa(library)}
