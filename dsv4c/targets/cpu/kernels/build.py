"""Build the dsv4 ONNX Runtime custom-op library (the C++ sources beside this file) into a cache.

    python -m dsv4c.targets.cpu.kernels.build           # build if needed (fetching the ORT headers), print the path
    python -m dsv4c.targets.cpu.kernels.build --check   # print the path if built, else exit 1

Load it with `dsv4c.targets.base.ort_session(path, custom_ops_library=library)` (SessionOptions.register_custom_ops_library):
the `dsv4` nodes then run these kernels instead of their ONNX function bodies.

Where things come from:
  * compiler: $CXX, else g++ / c++ / clang++ on PATH (C++17).
  * ORT C API header (onnxruntime_c_api.h): no PyPI wheel ships it and Debian bookworm has no package, so, in
    order: $DSV4C_ORT_INCLUDE; a system install (/usr/include/onnxruntime, /usr/local/include/onnxruntime);
    headers fetched earlier into the cache; else fetched now from Debian's `libonnxruntime-dev` 1.21.0+dfsg-1
    (the trixie package: an 85 KB .deb, sha256-pinned, unpacked in Python; when the pinned file is gone from
    the mirror, `apt-get download` with a private sources list, which leaves the system's apt alone). The mirror
    is $DSV4C_DEBIAN_MIRROR, else the Debian archive this machine's own apt sources name (`debian_mirror`):
    dsv4c names no download host of its own. API-21
    headers work with the newer runtime: the library asks ORT for the API version it was compiled with.
  * libonnxruntime: not linked. ORT passes its API table to `RegisterCustomOps`.
Instruction sets: no -march=native (the library must run on any x86-64 the artifact is copied to). The inner
loops are compiled four times, baseline, -mavx2 -mfma -mf16c, that plus AVX-512 F/BW/VL/DQ/BF16, and that plus
AMX-BF16, and the library picks the widest this CPU (and, for AMX, the kernel) allows (cpuid;
DSV4C_KERNEL_ISA=generic / avx2 / avx512bf16 / amx forces one).
Cache: $DSV4C_KERNEL_CACHE, else $XDG_CACHE_HOME/dsv4c/ortkernels, else ~/.cache/dsv4c/ortkernels, then
<sha256 of sources + flags + onnxruntime version>/libdsv4_ops.so, written atomically (build in a temporary
directory, then rename).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

from dsv4c.targets.base import ToolchainMissing

LIB_NAME = "libdsv4_ops.so"
SOURCE_DIR = Path(__file__).resolve().parent
COMMON_FLAGS = ["-std=c++17", "-O3", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off", "-fno-math-errno",
                "-Wall", "-Wextra", "-Wno-unused-parameter"]
AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c"]
AVX512BF16_FLAGS = [*AVX2_FLAGS, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16"]
ISA_FLAGS = {"isa_avx2.cc": AVX2_FLAGS,  # run only after a cpuid check (ops.cc)
             "isa_avx512bf16.cc": AVX512BF16_FLAGS,
             "isa_amx.cc": [*AVX512BF16_FLAGS, "-mamx-tile", "-mamx-bf16"]}
LINK_FLAGS = ["-shared", "-Wl,--no-undefined", "-pthread"]

# Debian trixie's libonnxruntime-dev: the only packaged ORT C/C++ API headers (no PyPI wheel ships them, bookworm
# has no package); every Debian mirror's pool holds it whatever release the machine runs
ORT_DEV_DEB = "libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb"
ORT_DEV_SHA256 = "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08"
HEADER = "onnxruntime_c_api.h"
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
OS_RELEASE = Path("/etc/os-release")


class KernelBuildError(RuntimeError):
    """The toolchain is there but compiling or linking the kernel library failed (message has the compiler output)."""


# ---- locations -----------------------------------------------------------------------------------------------
def cache_root() -> Path:
    if os.environ.get("DSV4C_KERNEL_CACHE"):
        return Path(os.environ["DSV4C_KERNEL_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "dsv4c" / "ortkernels"


def sources() -> list[Path]:
    return sorted(p for p in SOURCE_DIR.iterdir() if p.suffix in (".cc", ".h"))


def _ort_version() -> str:
    try:
        import onnxruntime
    except ImportError:
        return "none"
    return onnxruntime.__version__


def build_key() -> str:
    """Content hash of what decides the binary: sources, flags, onnxruntime version, machine."""
    h = hashlib.sha256()
    for p in sources():
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(repr((COMMON_FLAGS, ISA_FLAGS, LINK_FLAGS, _ort_version(), platform.machine())).encode())
    return h.hexdigest()[:16]


def library_path() -> Path | None:
    """The built library for the current sources, or None when it has not been built."""
    path = cache_root() / build_key() / LIB_NAME
    return path if path.is_file() else None


# ---- toolchain -------------------------------------------------------------------------------------------------
def find_compiler() -> str:
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    for name in candidates:
        found = shutil.which(name)
        if found:
            return found
    raise ToolchainMissing(
        f"no C++ compiler for the dsv4 ONNX Runtime kernels (looked for {', '.join(candidates)}); install one "
        "(Debian/Ubuntu: `apt-get install g++`) or set CXX")


def _has_header(d: Path) -> bool:
    return (d / HEADER).is_file()


def fetched_headers_dir() -> Path:
    return cache_root().parent / "ort-headers" / ORT_DEV_DEB.removesuffix(".deb")


def find_ort_headers(fetch: bool = True) -> Path:
    """Directory holding onnxruntime_c_api.h (see the module docstring for the search order)."""
    env = os.environ.get("DSV4C_ORT_INCLUDE")
    if env:
        if not _has_header(Path(env)):
            raise ToolchainMissing(f"DSV4C_ORT_INCLUDE={env} holds no {HEADER}")
        return Path(env)
    for d in (Path("/usr/include/onnxruntime"), Path("/usr/local/include/onnxruntime"),
              fetched_headers_dir() / "include"):
        if _has_header(d):
            return d
    if not fetch:
        raise ToolchainMissing(f"ONNX Runtime C API headers ({HEADER}) not found: set DSV4C_ORT_INCLUDE, install "
                               "libonnxruntime-dev, or run `python -m dsv4c.targets.cpu.kernels.build` to fetch them")
    return fetch_ort_headers()


# ---- the Debian mirror: the one this machine's apt already uses ---------------------------------------------------
def apt_entries(sources: tuple[Path, ...] = APT_SOURCES) -> list[tuple[str, list[str], list[str]]]:
    """(URI, suites, components) of every enabled `deb` entry in the apt sources: one-line `.list` files and
    deb822 `.sources` files (other names in sources.list.d, e.g. `*.disabled`, are ignored, as apt does)."""
    files: list[Path] = []
    for src in sources:
        if src.is_dir():
            files += sorted(p for p in src.iterdir() if p.suffix in (".list", ".sources"))
        elif src.is_file():
            files.append(src)
    entries = []
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        entries += _deb822_entries(text) if f.suffix == ".sources" else _one_line_entries(text)
    return entries


def _one_line_entries(text: str) -> list[tuple[str, list[str], list[str]]]:
    out = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if words[:1] != ["deb"]:
            continue
        if len(words) > 1 and words[1].startswith("["):  # [arch=amd64 signed-by=...] options
            while len(words) > 2 and not words[1].endswith("]"):
                words.pop(1)
            words.pop(1)
        if len(words) >= 3:
            out.append((words[1], [words[2]], words[3:]))
    return out


def _deb822_entries(text: str) -> list[tuple[str, list[str], list[str]]]:
    out = []
    for para in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in para.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
            continue
        for uri in fields.get("uris", "").split():
            out.append((uri, fields.get("suites", "").split(), fields.get("components", "").split()))
    return out


def debian_mirror(sources: tuple[Path, ...] = APT_SOURCES, os_release: Path = OS_RELEASE) -> str:
    """$DSV4C_DEBIAN_MIRROR, else the Debian archive in this machine's apt sources: an entry for the release's
    own suite (its codename, e.g. bookworm) with the `main` component; security archives are not mirrors."""
    if os.environ.get("DSV4C_DEBIAN_MIRROR"):
        return os.environ["DSV4C_DEBIAN_MIRROR"].rstrip("/")
    release = {}
    if os_release.is_file():
        for line in os_release.read_text().splitlines():
            key, _, value = line.partition("=")
            release[key] = value.strip().strip('"')
    codename = release.get("VERSION_CODENAME")
    if release.get("ID") == "debian" and codename:
        for uri, suites, components in apt_entries(sources):
            if codename in suites and "main" in components and "security" not in uri:
                return uri.rstrip("/")
    raise ToolchainMissing("no Debian mirror found in this machine's apt sources (not a Debian system, or no entry "
                           "for its release with `main`): set DSV4C_DEBIAN_MIRROR to a Debian mirror, or "
                           f"DSV4C_ORT_INCLUDE to a directory holding {HEADER}")


def fetch_ort_headers() -> Path:
    """Download Debian's libonnxruntime-dev and unpack its headers into the cache; returns the include dir."""
    dest = fetched_headers_dir()
    errors = []
    deb = None
    mirror = debian_mirror()
    url = f"{mirror}/pool/main/o/onnxruntime/{ORT_DEV_DEB}"
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            data = r.read()
        if hashlib.sha256(data).hexdigest() != ORT_DEV_SHA256:
            raise ValueError(f"sha256 mismatch for {url}")
        deb = data
    except Exception as e:  # noqa: BLE001 - any failure falls through to apt, then to one clear message
        errors.append(f"{url}: {e}")
        try:
            deb = _apt_download("libonnxruntime-dev", mirror)
        except Exception as e2:  # noqa: BLE001
            errors.append(f"apt-get download libonnxruntime-dev (trixie): {e2}")
    if deb is None:
        raise ToolchainMissing("could not fetch the ONNX Runtime C API headers (Debian trixie libonnxruntime-dev):\n  "
                               + "\n  ".join(errors) + "\nset DSV4C_ORT_INCLUDE to a directory holding " + HEADER)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=dest.parent))
    try:
        _unpack_headers(deb, tmp / "include")
        if not _has_header(tmp / "include"):
            raise ToolchainMissing(f"the fetched libonnxruntime-dev package holds no {HEADER}")
        try:
            os.replace(tmp, dest)
        except OSError:  # another process got there first
            if not _has_header(dest / "include"):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest / "include"


def _unpack_headers(deb: bytes, out: Path) -> None:
    """A .deb is an `ar` archive holding data.tar.*; copy its usr/include/onnxruntime/ files into `out`."""
    if not deb.startswith(b"!<arch>\n"):
        raise ToolchainMissing("the fetched libonnxruntime-dev is not a Debian package")
    pos = 8
    while pos + 60 <= len(deb):
        name = deb[pos:pos + 16].decode().strip().rstrip("/")
        size = int(deb[pos + 48:pos + 58].decode().strip())
        body = deb[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
        if not name.startswith("data.tar"):
            continue
        prefix = "usr/include/onnxruntime/"
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
            for member in tar.getmembers():
                rel = member.name.removeprefix("./")
                if member.isfile() and rel.startswith(prefix) and ".." not in rel:
                    target = out / rel[len(prefix):]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(tar.extractfile(member).read())
        return
    raise ToolchainMissing("the fetched libonnxruntime-dev package has no data archive")


def _apt_download(package: str, mirror: str) -> bytes:
    """`apt-get download` from Debian trixie with a private sources list and state dirs (system apt untouched)."""
    apt = shutil.which("apt-get")
    if not apt:
        raise FileNotFoundError("apt-get not available")
    keyring = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
    with tempfile.TemporaryDirectory() as work:
        w = Path(work)
        for d in ("parts", "lists/partial", "cache/archives/partial"):
            (w / d).mkdir(parents=True)
        (w / "sources.list").write_text("")
        (w / "parts" / "trixie.sources").write_text(
            f"Types: deb\nURIs: {mirror}\nSuites: trixie\nComponents: main\nSigned-By: {keyring}\n")
        opts = [f"-o=Dir::Etc::SourceList={w / 'sources.list'}", f"-o=Dir::Etc::SourceParts={w / 'parts'}",
                f"-o=Dir::State::Lists={w / 'lists'}", f"-o=Dir::Cache={w / 'cache'}", "-o=Debug::NoLocking=1"]
        for args in (["update"], ["download", package]):
            r = subprocess.run([apt, *opts, *args], cwd=w, capture_output=True, text=True, timeout=300)
            if r.returncode:
                raise RuntimeError(f"apt-get {' '.join(args)} failed: {r.stderr.strip()[-500:]}")
        debs = sorted(w.glob(f"{package}_*.deb"))
        if not debs:
            raise RuntimeError("apt-get download produced no .deb")
        return debs[-1].read_bytes()


# ---- build -----------------------------------------------------------------------------------------------------
def build_library(out_dir: str | Path | None = None, *, fetch_headers: bool = True, force: bool = False) -> Path:
    """Compile the kernel library (unless the cache already has it) and return its path.

    out_dir: where to put libdsv4_ops.so (default: the content-addressed cache entry). Raises ToolchainMissing
    naming the missing compiler or headers, KernelBuildError when compiling fails."""
    target_dir = Path(out_dir) if out_dir is not None else cache_root() / build_key()
    target = target_dir / LIB_NAME
    if target.is_file() and not force:
        return target
    cxx = find_compiler()
    include = find_ort_headers(fetch=fetch_headers)
    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=target_dir) as tmp:
        objects = _compile_all(cxx, include, Path(tmp))
        out = Path(tmp) / LIB_NAME
        _run([cxx, *objects, *LINK_FLAGS, "-o", str(out)], "link")
        os.replace(out, target)  # atomic: readers see the old library or the new one, never half of one
    return target


def _compile_all(cxx: str, include: Path, tmp: Path) -> list[str]:
    """Each .cc to an object, all at once (a few seconds each; the machine has 2+ cores)."""
    procs = []
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    for src in (p for p in sources() if p.suffix == ".cc" and (x86 or p.name not in ISA_FLAGS)):
        obj = tmp / (src.stem + ".o")
        cmd = [cxx, *COMMON_FLAGS, *ISA_FLAGS.get(src.name, []), "-I", str(include), "-I", str(SOURCE_DIR),
               "-c", str(src), "-o", str(obj)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append((src, obj, cmd, proc))
    failures = []
    for src, obj, cmd, proc in procs:
        output, _ = proc.communicate()
        if proc.returncode:
            failures.append(f"$ {' '.join(cmd)}\n{output[-4000:]}")
    if failures:
        raise KernelBuildError("compiling the dsv4 ORT kernels failed:\n" + "\n".join(failures))
    return [str(obj) for _, obj, _, _ in procs]


def _run(cmd: list[str], what: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        output = (r.stdout + r.stderr)[-4000:]
        raise KernelBuildError(f"{what} of the dsv4 ORT kernels failed:\n$ {' '.join(cmd)}\n{output}")


def kernel_isa(library: str | Path) -> str:
    """Which inner loops the library runs on this CPU ("amx", "avx512bf16", "avx2" or "generic")."""
    import ctypes

    fn = ctypes.CDLL(str(library)).dsv4_kernels_isa
    fn.restype = ctypes.c_char_p
    return fn().decode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsv4c.targets.cpu.kernels.build",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="directory for libdsv4_ops.so (default: the cache)")
    parser.add_argument("--check", action="store_true", help="only report whether the library is built")
    parser.add_argument("--force", action="store_true", help="rebuild even if the cache has it")
    parser.add_argument("--no-fetch", action="store_true", help="never download the ORT headers")
    args = parser.parse_args(argv)
    if args.check:
        path = library_path()
        print(path if path else "not built")
        return 0 if path else 1
    start = time.perf_counter()
    try:
        path = build_library(args.out, fetch_headers=not args.no_fetch, force=args.force)
    except (ToolchainMissing, KernelBuildError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 4 if isinstance(e, ToolchainMissing) else 6
    print(f"{path}  ({kernel_isa(path)} loops, {time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
