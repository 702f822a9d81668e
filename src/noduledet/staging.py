"""Outputs that appear only when complete: written into a hidden sibling, then renamed."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from noduledet.errors import UserError


def staging_path(out: Path) -> Path:
    """The hidden sibling a folder is written into before it becomes ``out``."""
    return out.with_name(f".{out.name}.partial")


@contextmanager
def staged_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty folder that replaces ``out`` when the block ends without an error.

    An existing ``out`` is refused unless ``force``; on an error the folder is removed and
    ``out`` is left as it was.
    """
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out}: exists; pass --force to replace it")
    tmp = staging_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
