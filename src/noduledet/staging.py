"""Outputs that appear only when complete.

Two shapes, one rule: a file is written under a temporary name beside it and renamed
(``atomic_write``), a folder is written into a hidden sibling and renamed (``staged_dir``).
A write that fails — the disk full, an interruption, a bug — leaves the previous file or
folder as it was and no temporary behind; running out of space is a ``UserError`` naming
the file.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from noduledet.errors import NoSpaceError, UserError


def _space_error(path: Path, err: OSError, kept: str = "the previous version is kept") -> NoSpaceError:
    return NoSpaceError(f"{path}: no space left on the device; {kept} ({err.strerror})")


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` for a temporary file beside ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            raise _space_error(path, err) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, obj) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=1, default=float))


def staging_path(out: Path) -> Path:
    """The hidden sibling a folder is written into before it becomes ``out``."""
    return out.with_name(f".{out.name}.partial")


def refuse_existing(out: str | Path, force: bool) -> None:
    """Refuse an existing ``out`` unless ``force``; refuse a file where a folder is wanted."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: is a file, not a folder; choose another output path")
    if out.exists() and not force:
        raise UserError(f"{out}: exists; pass --force to replace it")


@contextmanager
def staged_dir(out: str | Path, force: bool = False, owner: bool = True) -> Iterator[Path]:
    """Yield an empty folder that replaces ``out`` when the block ends without an error.

    An existing ``out`` is refused unless ``force``; on an error the folder is removed and
    ``out`` is left as it was. Several processes writing one folder (torchrun) pass
    ``owner=False`` but on rank 0: they get the same path and neither create nor rename it.
    """
    out = Path(out)
    if not owner:
        yield staging_path(out)
        return
    refuse_existing(out, force)
    tmp = staging_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno == errno.ENOSPC:
            raise _space_error(out, err, "nothing half-written is left") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
