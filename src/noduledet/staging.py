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
