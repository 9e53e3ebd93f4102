"""The artifact contract between the compiler (which writes it) and the runtime (which reads it).

    <artifact>/
      manifest.json         this file's schema: what was built, from what, with which tools, how it validated
      recipe.lock.yaml      the fully resolved recipe
      config.json           the model config (official HF field names)
      tokenizer/            tokenizer.json + tokenizer_config.json
      engine/               target-specific engine files (CPU: prefill.onnx, decode.onnx + weights, kernels)
      validation.json       the validate stage's report

It lives outside both `compiler` and `runtime` so neither reaches into the other.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST_SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class ArtifactError(RuntimeError):
    """The artifact cannot be used here; the message says why and what to do."""


class EngineFailure(RuntimeError):
    """A loaded engine stopped working while it ran (a worker process of a multi-device engine died or failed):
    the message names the rank and how; the engine is unusable, load the artifact again."""


class NotAnArtifact(ArtifactError):
    """The directory holds no readable manifest: it is not a dsv4c artifact (a wrong path, not a wrong tool)."""


@dataclass(frozen=True)
class Manifest:
    data: dict[str, Any]

    @property
    def target(self) -> str:
        return self.data["target"]["kind"]

    @property
    def engine(self) -> dict[str, Any]:
        return self.data["engine"]

    @property
    def runtime(self) -> dict[str, Any]:
        return self.data["runtime"]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_digests(root: Path) -> dict[str, str]:
    """sha256 of every file under root except the manifest itself, keyed by relative path."""
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def write_manifest(root: Path, data: dict[str, Any]) -> None:
    data = {"schema_version": MANIFEST_SCHEMA_VERSION, **data, "outputs": file_digests(root)}
    (root / MANIFEST).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_manifest(root: str | Path, verify: bool = False) -> Manifest:
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise NotAnArtifact(f"{root}: no {MANIFEST}; not a dsv4c artifact (build one with `dsv4c build RECIPE`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise NotAnArtifact(f"{path}: unreadable manifest ({e.msg} at line {e.lineno}); rebuild the artifact") from None
    version = data.get("schema_version")
    if version != MANIFEST_SCHEMA_VERSION:
        raise ArtifactError(f"{path}: manifest schema version {version!r}, this dsv4c reads version "
                            f"{MANIFEST_SCHEMA_VERSION}; rebuild the artifact with this dsv4c or install the "
                            f"dsv4c version that built it ({data.get('dsv4c_version', 'unknown')})")
    if verify:
        for rel, digest in data.get("outputs", {}).items():
            f = root / rel
            if not f.is_file():
                raise ArtifactError(f"{f}: listed in the manifest but missing; the artifact is incomplete")
            if sha256_file(f) != digest:
                raise ArtifactError(f"{f}: sha256 differs from the manifest; the artifact was modified")
    return Manifest(data)
