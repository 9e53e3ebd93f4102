"""`dsv4c doctor`: what this machine can build and run, and what each missing piece disables.

Every check is local and quick (imports, PATH look-ups, the caches' sizes): nothing is downloaded or compiled, so
the doctor also works offline and on a machine where a build is failing.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import sys
from typing import Any

import click


def _check(name: str, found: str | None, disables: str) -> dict[str, Any]:
    """One row: `found` is what was found (a version, a path), None when missing."""
    return {"name": name, "ok": found is not None, "found": found, "disables": None if found else disables}


def _version(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", "present")
    except Exception:  # noqa: BLE001 - a broken install is as missing as an absent one
        return None


def python_checks() -> list[dict[str, Any]]:
    from dsv4c._version import __version__ as DSV4C_VERSION

    return [
        _check("python", sys.version.split()[0], ""),
        _check("dsv4c", DSV4C_VERSION, ""),
        _check("torch", _version("torch"), "everything: export, the reference model and validation need torch"),
        _check("onnx", _version("onnx"), "lowering to ONNX (every target)"),
        _check("onnxruntime", _version("onnxruntime"),
               "CPU engines, `--emulate` and the validate stage (they run on ONNX Runtime)"),
    ]


def kernel_checks() -> list[dict[str, Any]]:
    """The C++ kernel library of the CPU target: compiler, ORT headers, the built library."""
    from dsv4c.compiler.plan import cxx_version
    from dsv4c.targets.base import ToolchainMissing
    from dsv4c.targets.cpu.kernels import build as kb

    cxx = cxx_version()
    try:
        headers: str | None = str(kb.find_ort_headers(fetch=False))
    except ToolchainMissing:
        headers = None
    library = kb.library_path()
    slow = "CPU engines fall back to the ONNX function bodies (same numerics, ~100x slower ops; recorded)"
    return [
        _check("C++ compiler", None if cxx == "missing" else cxx, f"the C++ kernel library: {slow}"),
        _check("ONNX Runtime C API headers", headers,
               "nothing yet: the first CPU build fetches them (Debian libonnxruntime-dev, from the Debian mirror "
               "in this machine's apt sources) unless DSV4C_ORT_INCLUDE points at them; offline, " + slow),
        _check("kernel library (libdsv4_ops.so)", str(library) if library else None,
               "nothing yet: it is compiled on the first CPU build (or `python -m dsv4c.targets.cpu.kernels.build`)"),
    ]


def accelerator_checks() -> list[dict[str, Any]]:
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        gpu = None
    if gpu is None and shutil.which("nvidia-smi"):
        gpu = "nvidia-smi present (torch here has no CUDA)"
    trt = _version("tensorrt")
    return [
        _check("NVIDIA GPU", gpu, "TensorRT engine builds and runs (`--until lower` bundles and `--emulate` work)"),
        _check("TensorRT", trt, "`dsv4c build` of tensorrt recipes past `--until lower` and `--from-bundle` "
                                "(build the bundle here, finish it on a TensorRT host)"),
        _check("Triton", _version("triton") if importlib.util.find_spec("triton") else None,
               "the TensorRT plugins' kernels (JIT) at TensorRT build and run time"),
        _check("CANN ATC (atc)", shutil.which("atc"),
               "`dsv4c build` of cann recipes past `--until lower` (the bundle carries its atc command lines)"),
    ]


def cache_rows() -> list[dict[str, Any]]:
    from dsv4c.compiler.pipeline import default_cache_dir, dir_bytes
    from dsv4c.targets.cpu.kernels import build as kb

    rows = [("stage cache", default_cache_dir(), "DSV4C_CACHE_DIR or --cache-dir"),
            ("kernel library cache", kb.cache_root(), "DSV4C_KERNEL_CACHE"),
            ("ORT headers", kb.fetched_headers_dir(), "DSV4C_ORT_INCLUDE to use your own")]
    return [{"name": name, "path": str(path), "exists": path.exists(),
             "bytes": dir_bytes(path) if path.exists() else 0, "set_with": how} for name, path, how in rows]


def diagnose() -> dict[str, Any]:
    checks = python_checks() + kernel_checks() + accelerator_checks()
    return {"checks": checks, "caches": cache_rows(),
            "targets": {"cpu": all(c["ok"] for c in checks if c["name"] in ("torch", "onnx", "onnxruntime")),
                        "tensorrt_engine": all(c["ok"] for c in checks if c["name"] in ("NVIDIA GPU", "TensorRT")),
                        "cann_engine": all(c["ok"] for c in checks if c["name"] == "CANN ATC (atc)")}}


def render(report: dict[str, Any]) -> None:
    from dsv4c.compiler.pipeline import human_bytes

    styled = sys.stdout.isatty()

    def tag(ok: bool) -> str:
        word = "ok" if ok else "missing"
        return click.style(f"{word:>7}", fg="green" if ok else "yellow") if styled else f"{word:>7}"

    click.echo("toolchain")
    for c in report["checks"]:
        click.echo(f"{tag(c['ok'])}  {c['name']}: " + (c["found"] if c["ok"] else f"disables {c['disables']}"))
    click.echo("caches")
    for c in report["caches"]:
        size = human_bytes(c["bytes"]) if c["exists"] else "not created yet"
        click.echo(f"         {c['name']}: {c['path']} ({size}; {c['set_with']})")
    t = report["targets"]
    yes = {True: "yes", False: "no"}
    click.echo(f"can build here: CPU engines, TensorRT and CANN bundles {yes[t['cpu']]}; TensorRT engines "
               f"{yes[t['tensorrt_engine']]}; CANN .om {yes[t['cann_engine']]}")


__all__ = ["diagnose", "render"]
