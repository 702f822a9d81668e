"""A training run's folder: created, resumed or replaced, and everything written into it.

```
RUN/
  config.yaml    the resolved configuration        meta.json   seed, versions, git hash, device
  splits.json    train / val / test scans          metrics.csv one row per epoch
  last.pt        the latest checkpoint (resumable)  best.pt     the best validation score so far
  tb/            TensorBoard logs
```

Every file is written atomically; ``metrics.csv`` is written and read here only.
"""

from __future__ import annotations

import csv
import math
import platform
import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import torch

from noduledet import __version__, checkpoint
from noduledet.checkpoint import Checkpoint
from noduledet.config import Config, config_yaml
from noduledet.errors import UserError
from noduledet.records import read_splits, write_meta, write_splits
from noduledet.staging import atomic_write, write_text


def git_hash() -> str | None:
    """The short commit hash of the installed source, when it is a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class RunFolder:
    """The folder ``path`` of one training run.

    Args:
        resume: continue the run in ``path`` from its ``last.pt``; a run stopped before its first
            epoch ended (no ``last.pt``) starts again, if its ``config.yaml`` is this one's.
        force: start afresh over an existing run.
        cfg: the run's configuration (checked against a run stopped before its first epoch).

    A folder that holds files is refused unless ``resume`` or ``force``.
    """

    STALE = ("last.pt", "best.pt", "metrics.csv", "stage2_candidates.json")

    def __init__(self, path: str | Path, resume: bool = False, force: bool = False, cfg: Config | None = None):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"{self.path}: is a file, not a run folder")
        started = self.path / "config.yaml"
        if resume and not self.last.is_file():
            if not self.path.exists() or not any(self.path.iterdir()):
                raise UserError(f"{self.last}: nothing to resume")
            if cfg is not None and started.is_file() and started.read_text() != config_yaml(cfg):
                raise UserError(f"{self.path}: stopped before its first epoch with another config.yaml; "
                                f"pass --force to start it afresh")
        if not resume and self.path.exists() and any(self.path.iterdir()) and not force:
            raise UserError(f"{self.path}: exists; pass --resume to continue it or --force to overwrite it")
        self.resuming = resume and self.last.is_file()

    @property
    def last(self) -> Path:
        return self.path / "last.pt"

    @property
    def best(self) -> Path:
        return self.path / "best.pt"

    def start(self, cfg: Config, splits: dict, device: torch.device, world: int) -> None:
        """Begin a fresh run: clear what an earlier run left, write the config, splits and metadata."""
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.STALE:
            (self.path / stale).unlink(missing_ok=True)
        shutil.rmtree(self.path / "tb", ignore_errors=True)  # a forced restart must not mix curves
        write_text(self.path / "config.yaml", config_yaml(cfg))
        write_splits(self.path, splits)
        write_meta(self.path, {
            "noduledet": __version__, "git": git_hash(), "torch": torch.__version__, "seed": cfg.train.seed,
            "device": str(device), "world_size": world, "python": platform.python_version(),
            "machine": platform.machine(), "threads": torch.get_num_threads(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")})

    def save(self, ckpt: Checkpoint, improved: bool) -> None:
        """Write ``last.pt`` (with the resume state) and, when ``improved``, ``best.pt`` (without)."""
        checkpoint.save(ckpt, self.last)
        if improved:
            checkpoint.save(ckpt.without_training(), self.best)

    def update(self, **fields) -> None:
        """Write ``fields`` of ``Checkpoint`` into both checkpoints: the stages trained after the
        detector (``proposer``, ``stage2``: None for none), ``operating_points``, ``config``."""
        for path in (self.best, self.last):
            checkpoint.save(replace(checkpoint.load(path), **fields), path)

    def write_metrics(self, history: list[dict]) -> None:
        """``metrics.csv``: one row per epoch, a column per key any epoch has."""
        keys: list[str] = []
        for row in history:
            keys += [k for k in row if k not in keys]

        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=keys)
                w.writeheader()
                for row in history:
                    w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

        atomic_write(self.path / "metrics.csv", write)

    def splits(self) -> dict[str, list[str]]:
        return read_splits(self.path)

    def tensorboard(self):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(self.path / "tb")


def read_metrics(path: str | Path) -> list[dict]:
    """A run's ``metrics.csv`` as rows of floats (epoch as int; empty cells as NaN)."""
    with open(path, newline="") as f:
        return [{k: (int(v) if k == "epoch" else float(v) if v not in ("", "nan") else math.nan)
                 for k, v in row.items()} for row in csv.DictReader(f)]
