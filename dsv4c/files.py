"""One copy of the weights on disk: the stage cache's bundle, the built engine and the artifact share their files
by hard link instead of each holding a copy (at V4-Flash size each copy is ~160 GB).

This is safe because none of those files is ever modified in place: a stage writes into a fresh temporary
directory that is renamed into the cache (`pipeline.Build.store_dir`), an artifact is assembled in a fresh
directory beside its output and renamed over it (`pipeline.staged_output`), and replacing either removes the old
directory entries (the inode lives on in whatever still links it) rather than writing into them. Code that wants
to edit an engine file must write a new file (tests/mutants.py copies first for that reason).

Linking fails across filesystems (a stage cache on one disk, the output on another) and on filesystems without
hard links; each file is then copied, and one warning per directory says so on the `dsv4c.files` logger (a build
turns it into a line of its events), so a second copy on disk is never a surprise."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

log = logging.getLogger("dsv4c.files")


@dataclass
class LinkReport:
    """What `link_tree` did: files hard-linked, files copied because linking failed (and why)."""

    linked: int = 0
    copied: int = 0
    copied_bytes: int = 0
    reason: str | None = None  # the first linking error, when a file had to be copied


def link_or_copy(src: Path, dst: Path, report: LinkReport) -> None:
    """`dst` becomes a hard link to `src`; a copy when the filesystem refuses the link (recorded in `report`)."""
    try:
        os.link(src, dst)
    except OSError as e:  # EXDEV across filesystems, EPERM/EMLINK/ENOTSUP where links are not possible
        shutil.copy(src, dst)
        report.copied += 1
        report.copied_bytes += dst.stat().st_size
        report.reason = report.reason or f"{type(e).__name__}: {e.strerror or e}"
    else:
        report.linked += 1


def link_tree(src: Path, dst: Path, skip: Iterable[str] = ()) -> LinkReport:
    """Lay out the files under `src` in `dst` (created; subdirectories too) as hard links, copying only where
    linking fails, and warn once when any file was copied. `skip`: names (at any depth) left out."""
    skip = set(skip)
    report = LinkReport()
    dst.mkdir(parents=True, exist_ok=True)
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if d not in skip)
        here = dst / Path(root).relative_to(src)
        here.mkdir(exist_ok=True)
        for name in sorted(files):
            if name not in skip:
                link_or_copy(Path(root) / name, here / name, report)
    if report.copied:
        log.warning("%s: %d file(s), %s, copied from %s instead of hard-linked (%s): the disk holds a second "
                    "copy of them; put the stage cache (DSV4C_CACHE_DIR / --cache-dir) and the output on one "
                    "filesystem to keep one", dst, report.copied, f"{report.copied_bytes / 1e6:.1f} MB", src,
                    report.reason)
    return report

