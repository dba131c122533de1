"""Write outputs beside their final place, then rename: a crash never leaves a half-written output.

A stage builds each output in a hidden sibling (same filesystem, so the final rename is atomic)
and only replaces the real path once everything succeeded. On any exception, Ctrl-C included,
the sibling is deleted and whatever was at the real path before is untouched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _replace(staged: Path, final: Path) -> None:
    if final.exists() or final.is_symlink():
        # Move the old output aside first so the final path is never missing for long and a
        # failed rename can be undone.
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        try:
            os.replace(staged, final)
        except BaseException:
            os.replace(old, final)
            raise
        _remove(old)
    else:
        os.replace(staged, final)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty staging folder that becomes ``final`` when the block exits cleanly."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield staged
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    _replace(staged, final)


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a staging file path that becomes ``final`` when the block exits cleanly."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.close(fd)
    staged = Path(name)
    try:
        yield staged
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    _replace(staged, final)


def write_text_atomic(final: Path, text: str) -> None:
    with atomic_file(final) as staged:
        staged.write_text(text)


@contextlib.contextmanager
def atomic_outputs(*finals: Path) -> Iterator[tuple[Path, ...]]:
    """Stage several outputs together; none replaces its final path unless all were written."""
    with contextlib.ExitStack() as stack:
        staged = tuple(
            stack.enter_context(atomic_dir(p) if not p.suffix else atomic_file(p)) for p in finals
        )
        yield staged


@contextlib.contextmanager
def staged_outputs(*finals: Path, publish: bool) -> Iterator[tuple[Path, ...]]:
    """``atomic_outputs`` in the process that publishes; elsewhere (a DDP worker) throwaway
    folders, so only one process ever replaces the real outputs."""
    if publish:
        with atomic_outputs(*finals) as staged:
            yield staged
        return
    with tempfile.TemporaryDirectory(prefix="depthpipe-worker-") as scratch:
        yield tuple(Path(scratch) / f"{i}-{p.name}" for i, p in enumerate(finals))
