"""Writing files so that a crash never leaves a torn one: write, fsync, rename; and telling a full disk from
other failures to write."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path

# a write refused for want of space: the filesystem full, or the user's quota spent
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NO_SPACE_TEXT = tuple(
    os.strerror(code) for code in NO_SPACE
)  # "No space left on device", "Disk quota exceeded"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write, fsync and rename, so `path` holds either the old or the new content, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # (a full disk left it empty or torn)
        raise


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def out_of_space(e: BaseException) -> bool:
    """Whether `e`, or an error it wraps (its cause and context, DCP's per-rank failures), is a write refused for
    want of space. safetensors says so only in its message ("... code: 28, kind: StorageFull ...")."""
    seen: set[int] = set()
    todo: list = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, tuple):  # DCP's (exception, stack summary)
            todo.append(x[0])
            continue
        if isinstance(x, OSError) and x.errno in NO_SPACE:
            return True
        if any(text in str(x) for text in (*NO_SPACE_TEXT, "StorageFull")):
            return True
        failures = getattr(x, "failures", None)
        todo += [x.__cause__, x.__context__, *(failures.values() if isinstance(failures, dict) else ())]
    return False


def free_bytes(path: Path) -> int:
    """Free space for this user on the filesystem that holds `path` (or would: its nearest existing parent)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def tree_bytes(path: Path) -> int:
    """The size of the files under `path` (0 where there is nothing)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"
