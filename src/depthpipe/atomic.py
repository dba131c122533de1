"""Write outputs beside their final place, then rename: a crash never leaves a half-written output.

A stage builds each output in a hidden sibling (same filesystem, so the final rename is atomic)
and only replaces the real path once everything succeeded. On any exception, Ctrl-C included,
the sibling is deleted and whatever was at the real path before is untouched.

A process killed outright (SIGKILL, a lost node) cannot clean up: its hidden siblings stay
(``.<name>.tmp-<random>`` being built, ``.<name>.old-<pid>`` moved aside). Staging the same
output again removes them first, so the next run of the stage sweeps what a killed one left.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _staging_prefix(final: Path) -> str:
    return f".{final.name}.tmp-"  # tempfile appends a random part of letters, digits and _


def _aside(final: Path) -> Path:
    return final.with_name(f".{final.name}.old-{os.getpid()}")


def leftovers(final: Path) -> list[Path]:
    """The hidden siblings earlier stagings of ``final`` left: ``.<name>.tmp-<random>`` and
    ``.<name>.old-<pid>``. Neither suffix holds a dot, so the leftovers of an output named
    ``a.tmp-x`` (``.a.tmp-x.tmp-<random>``) are not taken for those of ``a``."""
    if not final.parent.is_dir():
        return []
    own = re.compile(rf"\.{re.escape(final.name)}\.(tmp-[^.]+|old-[0-9]+)")
    with os.scandir(final.parent) as entries:
        return sorted(final.parent / e.name for e in entries if own.fullmatch(e.name))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def remove_leftovers(final: Path) -> None:
    for path in leftovers(final):
        _remove(path)


def _replace(staged: Path, final: Path) -> None:
    if final.exists() or final.is_symlink():
        # Move the old output aside first so the final path is never missing for long and a
        # failed rename can be undone.
        old = _aside(final)
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
    """Yield an empty staging folder that becomes ``final`` when the block exits cleanly
    (what killed earlier stagings of ``final`` left is removed first)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(final)
    staged = Path(tempfile.mkdtemp(prefix=_staging_prefix(final), dir=final.parent))
    try:
        yield staged
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    _replace(staged, final)


@contextlib.contextmanager
def atomic_file(final: Path, *, sweep: bool = False) -> Iterator[Path]:
    """Yield a staging file path that becomes ``final`` when the block exits cleanly.

    ``sweep``: first remove what killed earlier stagings of ``final`` left. That lists the
    folder, so it is off by default: predict writes thousands of files into one user folder,
    where a listing per file would make the run quadratic. Stage outputs (atomic_outputs,
    write_text_atomic) sweep; their folders are small.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    if sweep:
        remove_leftovers(final)
    fd, name = tempfile.mkstemp(prefix=_staging_prefix(final), dir=final.parent)
    os.close(fd)
    staged = Path(name)
    try:
        yield staged
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    _replace(staged, final)


def write_text_atomic(final: Path, text: str) -> None:
    with atomic_file(final, sweep=True) as staged:
        staged.write_text(text)


@contextlib.contextmanager
def atomic_outputs(*finals: Path) -> Iterator[tuple[Path, ...]]:
    """Stage several outputs together; none replaces its final path unless all were written."""
    with contextlib.ExitStack() as stack:
        staged = tuple(
            stack.enter_context(atomic_dir(p) if not p.suffix else atomic_file(p, sweep=True))
            for p in finals
        )
        yield staged
