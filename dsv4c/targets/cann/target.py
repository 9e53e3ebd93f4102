"""The CANN target (Huawei Ascend): an ATC-ready ONNX bundle with the V4 ops mapped to CANN operators, `.om`
models where the CANN toolkit exists.

    check:  the recipe's formats on the SoC. Ascend 950 runs DeepSeek's numerics natively as MX formats (FP8 dense
            -> MXFP8 and FP4 experts = MXFP4, both exact re-expressions); Ascend 910B (A2/A3) has no FP8/FP4
            arithmetic, so dense weights, experts and activations take the recipe's declared fallback (W8A8 INT8,
            experts INT8 or INT4), each recorded; without `on_unsupported: fallback` that is infeasible (exit 3).
    lower:  exported programs -> ONNX opset 18 (lowering.py; mapping.py names every CANN operator and its
            source), weights converted and their error measured (requant.py), external data; plus the ATC
            command lines (bundle.json `atc.commands`, build_om.sh) and the ONNX parser plugin source.
    build:  `atc` per program where the CANN toolkit is installed, else ToolchainMissing (exit 4).

What runs here: lower, the structural checks and the CPU emulation of the exact bundle (executor.py). What
cannot: ATC and the NPU (the CANN toolkit is on neither PyPI nor Debian).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable

import onnx

from dsv4c._version import __version__ as DSV4C_VERSION
from dsv4c.graphs.ops.onnx_builder import ONNX_DOMAIN
from dsv4c.targets.base import TargetCheck, ToolchainMissing
from dsv4c.targets.cann import mapping
from dsv4c.targets.cann.lowering import OPSET, hccl_groups, lower_program

ATC_OPS_FILE = Path(__file__).with_name("atc_onnx_ops.txt")
PRECISION_MODE = "allow_fp32_to_bf16"  # cube ops in bf16 (our activations are bf16-rounded already), vector
# ops keep fp32 where their kernel has it, bf16 where it has not (e.g. DynamicQuant, HcPre)
FORMATS = {  # what each quantization group becomes on the SoC (bundle.json `formats`)
    "Ascend950": {"dense": "MXFP8: e4m3 + e8m0 per 1x32 (exact re-expression of the FP8 128x128 scales)",
                  "experts": "MXFP4: shipped e2m1 + e8m0 per 1x32 (exact)",
                  "activations": "MXFP8 dynamic per 1x32 (DynamicMxQuant, scale_alg 1: DeepSeek's round-up "
                                 "pow2 scale on 32-blocks instead of 128)",
                  "dense_bf16": "bf16 for weights read without activation quantization (wo_a), exact"},
    "Ascend910B": {"dense": "INT8 per output channel (lossy, measured)",
                   "activations": "INT8 per-token dynamic (DynamicQuant)",
                   "dense_bf16": "bf16 for weights read without activation quantization (wo_a), exact"},
}
# Ascend 910B: what each group may fall back to (first = default), and why
FALLBACKS_910B = {
    "experts": (("int8", "int4"), "Ascend 910B has no FP4 arithmetic; INT8 holds 2 x e2m1 exactly, INT4 is W4A8"),
    "dense": (("int8",), "Ascend 910B has no FP8 arithmetic; W8A8 INT8 with per-channel weight scales"),
    "activations": (("int8",), "Ascend 910B has no FP8 arithmetic; per-token dynamic INT8 activations"),
}


class CannTarget:
    kind = "cann"
    # one weight file per program until ATC's handling of shared external data is verified; one .om per program
    weight_copies = {"lower_bundle": 2, "build_engine": 2, "artifact": 2}
    engine_links_bundle = False  # the engine is new files (one .om per program) compiled from the bundle
    scale_bytes = 4  # weight scales as float32

    def cache_copies(self, field: str) -> int:
        return 2  # the runtime's caches are double-buffered in NPU memory (executor.AclCache: current, spare)

    def session_state(self, layers: int) -> int:
        return 0  # the ACL model descriptions' and streams' memory is not modelled

    def kernel_scratch(self, op: str, args: tuple) -> int:
        return 0  # the ops' CANN kernels are not written yet (mapping.py: cann_kernel="TBD")

    def check(self, recipe: Any) -> TargetCheck:
        check = TargetCheck(toolchain=toolchain())
        t, q = recipe.target, recipe.quantization
        if t.soc_version == "Ascend950":
            for group, native in (("experts", "fp4"), ("dense", "fp8")):
                if getattr(q, group) != native:
                    check.problems.append(f"quantization.{group}={getattr(q, group)!r}: the Ascend 950 path is "
                                          f"{native} (re-expressed exactly as MX); set quantization.{group}: {native}")
        else:
            self._check_910b(q, check)
        return check

    @staticmethod
    def _check_910b(q: Any, check: TargetCheck) -> None:
        wanted = {"experts": q.experts, "dense": q.dense, "activations": q.activations}
        for group, (allowed, reason) in FALLBACKS_910B.items():
            have = wanted[group]
            if have in allowed or (group == "activations" and have == "none"):
                continue  # asked for directly (or no activation quantization at all)
            if q.on_unsupported != "fallback":
                pin = (f"fallback.{group}: {allowed[0]}" if group != "activations"
                       else "activations become per-token INT8")
                check.problems.append(f"quantization.{group}={have!r} cannot run on Ascend 910B ({reason}); set "
                                      f"quantization.on_unsupported: fallback ({pin})")
                continue
            to = q.fallback_for(group) or allowed[0]
            if to not in allowed:
                check.problems.append(f"quantization.fallback.{group}={to!r} is not implemented by the CANN target "
                                      f"on Ascend 910B (implemented: {', '.join(allowed)})")
                continue
            check.fallbacks.append({"group": group, "from": have, "to": to, "reason": reason})

    def lower(self, programs: dict[str, Any], bundle_dir: Path, recipe: Any, meta: dict[str, Any],
              weights: Callable[[str], Any] | None = None) -> None:
        from dsv4c.targets.cann import requant
        from dsv4c.targets.onnx_bundle import export_bundle_programs, op_census, read_op_list

        soc, rt = recipe.target.soc_version, recipe.runtime
        bits = expert_bits(recipe)
        bundle_dir.mkdir(parents=True, exist_ok=True)
        files = export_bundle_programs(programs, bundle_dir, OPSET, weights=weights)
        stats = requant.ErrorStats()
        atc_ops, unlisted, custom, shapes = read_op_list(ATC_OPS_FILE), set(), {}, {}
        mesh, rank = meta.get("mesh"), meta.get("rank", 0)
        groups = hccl_groups(mesh, rank) if mesh else {}
        for name, rel in files.items():
            model = lower_program(bundle_dir / rel, soc, bits, stats,
                                  {k: (g, len(r)) for k, (g, r) in groups.items()})
            for (domain, op), count in op_census(model).items():
                if domain == ONNX_DOMAIN:
                    unlisted |= {op} - atc_ops
                else:
                    custom[(domain, op)] = custom.get((domain, op), 0) + count
            shapes[name] = input_shape(model, name, rt.max_batch_size, rt.max_seq_len)
        commands = {p: shlex.join(atc_argv(files[p], f"om/{p}", soc, shapes[p])) for p in files}
        (bundle_dir / "cann_plugin").mkdir()
        (bundle_dir / "cann_plugin" / "dsv4c_onnx_plugin.cpp").write_text(mapping.plugin_source(list(custom)))
        (bundle_dir / "build_om.sh").write_text(build_script(files, soc, shapes))
        (bundle_dir / "bundle.json").write_text(json.dumps({
            **meta, "format": "onnx", "opset": OPSET, "programs": files, "soc_version": soc,
            "formats": {**FORMATS[soc], **({"experts": expert_format_text(bits)} if soc == "Ascend910B" else {})},
            "requantization": stats.summary(),
            "custom_ops": [{"domain": d, "op_type": op, "count": n, **_op_info(d, op)}
                           for (d, op), n in sorted(custom.items())],
            "atc": {"framework": 5, "soc_version": soc, "precision_mode": PRECISION_MODE, "input_format": "ND",
                    "input_shape": shapes, "commands": commands, "script": "build_om.sh",
                    "onnx_opsets": "11-18 (CANN ATC); bundle opset 18", "op_list": ATC_OPS_FILE.name},
            "atc_unlisted_ops": sorted(unlisted),
            "onnx_plugin": "cann_plugin/dsv4c_onnx_plugin.cpp",
            "cann_mapping": mapping.mapping_table(),
            "build_command": "bash build_om.sh   (or: dsv4c build --from-bundle DIR, on an Ascend host)",
            **({"mesh": mesh, "rank": rank, "hccl_groups": {g: r for g, r in groups.values()},
                "hccl": "create each hccl_groups entry (HcclCreateGroup / hccl create_group with its rank ids) in "
                        "the world communicator of the mesh (rank table: RANK_TABLE_FILE) before running the .om"}
               if mesh else {}),
        }, indent=2))

    def missing_build_toolchain(self) -> str | None:
        """Why `build` would stop with ToolchainMissing here (None when it would not): asked before export."""
        if toolchain()["atc"] == "missing":
            return ("CANN ATC (`atc`) is not on PATH: the .om build needs the CANN toolkit (source "
                    "<toolkit>/set_env.sh) plus the custom op package named in bundle.json `custom_ops`. Run `dsv4c "
                    "build RECIPE --until lower` for the relocatable bundle (its build_om.sh and bundle.json "
                    "`atc.commands` hold the exact ATC command lines) and build it on an Ascend host")
        return None

    def build(self, bundle_dir: Path, engine_dir: Path, recipe: Any) -> None:
        missing = self.missing_build_toolchain()
        if missing:
            raise ToolchainMissing(missing)
        have = toolchain()
        meta = json.loads((bundle_dir / "bundle.json").read_text())
        soc = os.environ.get("DSV4C_SOC_VERSION", meta["soc_version"])
        ran, models = {}, {}
        for program, rel in meta["programs"].items():
            argv = atc_argv(rel, str(engine_dir / program), soc, meta["atc"]["input_shape"][program])
            ran[program] = shlex.join(argv)
            proc = subprocess.run(argv, cwd=bundle_dir, capture_output=True, text=True)
            log = engine_dir / f"atc_{program}.log"
            log.write_text(proc.stdout + proc.stderr)
            if proc.returncode != 0:
                tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
                raise RuntimeError(f"atc failed on {rel} (exit {proc.returncode}); log {log}:\n" + "\n".join(tail))
            built = sorted(engine_dir.glob(f"{program}*.om"))
            if not built:
                raise RuntimeError(f"atc reported success on {rel} but wrote no {program}*.om in {engine_dir}")
            models[program] = built[0].name
        meta["atc"].update(commands_run=ran, soc_version_used=soc)
        meta.update(format="om", models=models, toolchain=have)
        (engine_dir / "engine.json").write_text(json.dumps(meta, indent=2))


def expert_bits(recipe: Any) -> int:
    """Ascend 910B expert weight bits: the recipe's format or its fallback (INT8 by default)."""
    q = recipe.quantization
    fmt = q.experts if q.experts in ("int8", "int4") else (q.fallback_for("experts") or "int8")
    return 4 if fmt == "int4" else 8


def expert_format_text(bits: int) -> str:
    return ("INT8 = 2 x e2m1 with scale/2 per 1x32 (exact)" if bits == 8 else
            "INT4 per 1x32, scale absmax/7 (lossy, measured)") + "; MoE kernel TBD"


def _op_info(domain: str, op_type: str) -> dict[str, str]:
    if domain == mapping.DOMAIN:
        op = mapping.CANN_OPS[op_type]
        return {"cann_operator": op.op_type, "kernel": op.kernel, "package": op.package, "source": op.source}
    m = mapping.MAPPING.get(op_type)
    return {"cann_operator": f"Dsv4{op_type}", "kernel": mapping.KERNEL_TBD,
            "package": "dsv4c (AscendC kernel TBD)", "nearest_public_op": m.nearest if m else ""}


def input_shape(model: onnx.ModelProto, program: str, max_batch: int, max_seq_len: int) -> str:
    """ATC `--input_shape` with ranges: dim 0 of every input is the batch (1~max_batch), the prompt length of
    prefill's tokens is 2~max_seq_len; every other dim must be static."""
    parts = []
    for i, v in enumerate(model.graph.input):
        dims = []
        for j, d in enumerate(v.type.tensor_type.shape.dim):
            if d.HasField("dim_value"):
                dims.append(str(d.dim_value))
            elif j == 0:
                dims.append(f"1~{max_batch}")
            elif i == 0 and j == 1:
                dims.append(f"2~{max_seq_len}")
            else:
                raise ValueError(f"{program}: input {v.name!r} dim {j} is dynamic ({d.dim_param}); the ATC "
                                 "command only knows the batch and prompt-length ranges")
        parts.append(f"{v.name}:{','.join(dims)}")
    return ";".join(parts)


def atc_argv(model: str, output: str, soc: str, shape: str) -> list[str]:
    return ["atc", "--framework=5", f"--model={model}", f"--output={output}", f"--soc_version={soc}",
            "--input_format=ND", f"--input_shape={shape}", f"--precision_mode={PRECISION_MODE}", "--log=error"]


def build_script(files: dict[str, str], soc: str, shapes: dict[str, str]) -> str:
    lines = [
        "#!/usr/bin/env bash",
        f"# Build the Ascend .om models of this dsv4c {DSV4C_VERSION} CANN bundle (exactly bundle.json",
        "# atc.commands with SOC_VERSION / OUT as variables). Needs, on the Ascend host:",
        "#   * the CANN toolkit (atc on PATH: source <toolkit>/set_env.sh);",
        "#   * a custom op package with the operators bundle.json custom_ops lists (HcPre/HcPost from",
        "#     cann-recipes-infer ops/ascendc; the kernels marked TBD are not public yet: ATC stops at them),",
        "#     its vendor directory in ASCEND_CUSTOM_OPP_PATH, and cann_plugin/dsv4c_onnx_plugin.cpp built",
        "#     into its framework/onnx_plugin;",
        "#   * SOC_VERSION set to the exact chip when the family name is not enough (npu-smi info).",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        f'SOC_VERSION="${{SOC_VERSION:-{soc}}}"',
        'OUT="${OUT:-om}"',
        'command -v atc >/dev/null || { echo "atc not found: source the CANN toolkit set_env.sh" >&2; exit 4; }',
        'mkdir -p "$OUT"',
    ]
    for program, rel in files.items():
        argv = atc_argv(rel, "OUT_PLACEHOLDER", "SOC_PLACEHOLDER", shapes[program])
        cmd = shlex.join(argv).replace("--output=OUT_PLACEHOLDER", f'--output="$OUT/{program}"')
        lines.append(cmd.replace("--soc_version=SOC_PLACEHOLDER", '--soc_version="$SOC_VERSION"'))
    return "\n".join(lines) + "\n"


def toolchain() -> dict[str, str]:
    """`atc` (its CANN version, "missing" when absent) and the pyACL runtime module."""
    atc = shutil.which("atc")
    return {"atc": _cann_version(Path(atc)) if atc else "missing",
            "pyacl": "present" if importlib.util.find_spec("acl") is not None else "missing"}


def _cann_version(atc: Path) -> str:
    """The CANN version beside the atc binary (version.info / version.cfg up the install tree)."""
    for parent in list(atc.resolve().parents)[:5]:
        for name in ("version.info", "version.cfg", "ascend_toolkit_install.info"):
            f = parent / name
            if f.is_file():
                m = re.search(r"version\s*=\s*\"?([\w.\-]+)", f.read_text(errors="replace"), re.IGNORECASE)
                if m:
                    return m.group(1)
    return "present (version unknown)"
