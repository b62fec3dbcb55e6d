"""Files and folders written whole or not at all, for the mask cache, the image cache, checkpoints and unpacked
exports."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(target: str | Path) -> Iterator[Path]:
    """A temporary path beside `target` for the block to write; when the block ends without an error, one
    rename puts it in `target`'s place. On one file system that is atomic: readers, other processes filling
    the same cache and a process killed half-way see the old file or the new one, never part of one, and
    other hard links to the old file keep its content. On an error the temporary file is removed.
    The writer creates the file itself, so it gets the usual permissions."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def link_atomically(source: str | Path, target: str | Path) -> None:
    """`target` becomes another name of `source`'s file (a hard link), replacing what `target` was."""
    if Path(target).exists() and os.path.samefile(source, target):
        return  # rename() between two names of one file does nothing and would leave the temporary behind
    with replacing(target) as tmp:
        os.link(source, tmp)


def link_or_copy(source: str | Path, target: str | Path) -> None:
    """`target` gets `source`'s content: a hard link, or a copy where the file system has no hard links (or
    they would cross file systems). Either way `target` is replaced whole."""
    try:
        link_atomically(source, target)
    except FileNotFoundError:
        raise
    except OSError:
        with replacing(target) as tmp:
            shutil.copyfile(source, tmp)


@contextmanager
def building_folder(target: str | Path) -> Iterator[Path]:
    """A temporary path beside `target` for the block to create and fill as a folder; when the block ends without
    an error, one rename makes it `target` (which must not exist yet), and on an error it is removed. A process
    killed half-way leaves a hidden `.<name>.*.tmp` folder, never a partial `target`. Call it holding
    `locked(target)`: it first removes what such a killed builder left."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def locked(target: str | Path) -> Iterator[None]:
    """Holds an exclusive lock on `<target>.lock` for the block: processes building the same `target` (the DDP
    processes of one run, two runs started together) take turns, so one builds it and the others find it."""
    import fcntl  # POSIX only; imported here so that the rest of this module works everywhere

    lock = Path(f"{target}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
