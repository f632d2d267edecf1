"""Writes that survive a crash: fsync, manifests of what was written, atomic directory swaps.

A directory is published by renaming a fully written and fsynced staging directory into place,
so a reader sees the old complete version or the new complete one, never a mix. A manifest
(``manifest.json``: size and SHA-256 of every file, written last) lets a reader prove a directory
is the one that was written, bit for bit.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from famtune.errors import FamtuneError

MANIFEST = "manifest.json"


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory (a directory's fsync makes its entries durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """fsync every file under ``directory``, then write and fsync the manifest of their sizes and hashes."""
    root = Path(directory)
    files: dict[str, Any] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        fsync_path(path)
        files[path.relative_to(root).as_posix()] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {"files": files}
    target = root / MANIFEST
    with open(target, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for sub in sorted({p.parent for p in root.rglob("*")} | {root}):
        fsync_path(sub)
    return manifest


def verify_manifest(directory: str | os.PathLike) -> str | None:
    """None when every file matches the manifest; otherwise what is wrong, in a few words."""
    root = Path(directory)
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
        assert isinstance(files, dict)
    except FileNotFoundError:
        return "no manifest.json (written incompletely or by an older famtune)"
    except (OSError, ValueError, KeyError, AssertionError, TypeError):
        return "manifest.json is unreadable"
    for name, entry in files.items():
        path = root / name
        try:
            size = path.stat().st_size
        except OSError:
            return f"{name} is missing"
        if not isinstance(entry, dict) or size != entry.get("size"):
            return f"{name} has {size} bytes, the manifest says {entry.get('size') if isinstance(entry, dict) else '?'}"
        if sha256_file(path) != entry.get("sha256"):
            return f"{name} does not match its SHA-256 (corrupted)"
    return None


def is_disk_full(exc: BaseException) -> bool:
    """Whether an error (or one it was raised from) is ENOSPC; libraries wrap it in their own types."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def directory_size(path: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def disk_full_error(path: str | os.PathLike, needed_bytes: int | None, what: str) -> FamtuneError:
    """``disk full at PATH (needs ~N MB, M MB free); what``: one line that says where and how much."""
    details = []
    if needed_bytes:
        details.append(f"needs ~{max(1, round(needed_bytes / 2**20))} MB")
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        details.append(f"{shutil.disk_usage(probe).free / 2**20:.1f} MB free")
    except OSError:
        pass
    return FamtuneError(f"disk full at {path}" + (f" ({', '.join(details)})" if details else "") + f"; {what}")


def replace_directory(staging: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Move a complete ``staging`` directory to ``dest``, replacing an earlier ``dest`` only at the end.

    The earlier directory is first renamed aside (``DEST.old-*``) and removed after the new one is
    in place, so at every instant ``dest`` is absent, the old version or the new one.
    """
    staging, dest = Path(staging), Path(dest)
    fsync_path(staging)
    old = None
    if dest.exists():
        old = dest.with_name(f"{dest.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dest, old)
    os.rename(staging, dest)
    fsync_path(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
