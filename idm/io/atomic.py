"""Atomic file and directory writes: a killed or failing writer never leaves a partial output.

Files are written to a temporary sibling (same directory, hence same file system), flushed and
fsync'ed, then moved over the target with :func:`os.replace`. Directories (checkpoints) are built
in a temporary sibling directory and swapped in as a whole.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    """The process umask (read once: ``os.umask`` can only be read by setting it)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _default_file_mode() -> int:
    """The permission bits an ordinary ``open(path, "w")`` would give (0o666 minus the umask)."""
    return 0o666 & ~_umask()


def _fsync_directory(directory: Path) -> None:
    """Persist a rename in ``directory`` (best effort: not every platform can open directories)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary file path next to ``path``; on success it is fsync'ed and replaces ``path``.

    For writers that want a file name (``safetensors.torch.save_file``, ``PIL.Image.save``). The
    parent directory is created if needed. On an exception the temporary file is removed and
    ``path`` is left untouched (absent, or with its previous content).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    temp = Path(temp_name)
    try:
        yield temp
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(temp, _default_file_mode())  # mkstemp creates 0o600
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` for writing; it replaces ``path`` only on success.

    Args:
        path: the final file; its parent directory is created if needed.
        mode: ``"wb"`` (default) or ``"w"`` for text (UTF-8 unless ``encoding`` is given).

    On an exception inside the ``with`` block the temporary file is removed and ``path`` is left
    untouched (absent, or with its previous content).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write supports modes 'w' and 'wb', got {mode!r}")
    if mode == "w" and encoding is None:
        encoding = "utf-8"
    with atomic_path(path) as temp:
        with open(temp, mode, encoding=encoding) as handle:
            yield handle


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces ``path`` as a whole on success.

    The caller writes every file of the output into the yielded directory. On success an existing
    ``path`` is first renamed aside, the new directory is moved in, then the old one is deleted, so
    ``path`` never holds a mix of old and new files or a half-written output. On an exception the
    temporary directory is deleted and ``path`` is left untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield temp
        os.chmod(temp, 0o777 & ~_umask())  # mkdtemp creates 0o700
        for file in temp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    old: Path | None = None
    if target.exists() or target.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        old.rmdir()  # only the unique name is wanted; os.replace needs it free
        os.replace(target, old)
    os.replace(temp, target)
    _fsync_directory(target.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 100, **layout: Any) -> None:
    """A matplotlib figure written atomically as PNG, then closed (also on failure); ``layout``:
    arguments of ``fig.tight_layout`` (e.g. ``rect``)."""
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout(**layout)
        with atomic_write(path) as handle:
            fig.savefig(handle, format="png", dpi=dpi)
    finally:
        plt.close(fig)
