"""The checkpoint format, written and read in one place.

A checkpoint is a dict of tensors and plain values (``torch.load(weights_only=True)`` reads
it): the format number, the noduledet version, the detector's variant and ``DetectorSpec``,
the run's resolved configuration, the model's weights, the epoch, the best validation score
and the history of epochs; once trained, the 3D proposer and the second stage (each a spec and
weights) and the operating points calibrated on the validation scans. ``last.pt`` also holds the
optimiser, scheduler, gradient scaler and RNG state that make ``--resume`` exact
(``training``). Files are written under a temporary name and renamed, so a checkpoint on disk
is always whole.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from noduledet import __version__
from noduledet.config import Config, config_from_dict
from noduledet.errors import UserError
from noduledet.staging import atomic_write

FORMAT = 2
OLD_STAGE2 = {"blobs": 0, "flips_top": 0, "synthetic": 0.0}  # what a run trained before these existed did
_noted: set[Path] = set()  # checkpoints whose filled-in settings were reported (once per process)


@dataclass
class Checkpoint:
    """What a run saves.

    Attributes:
        variant: detector variant (``noduledet.models.VARIANTS``).
        spec: the ``DetectorSpec`` as a plain dict.
        config: the run's configuration.
        model: the detector's state dict.
        epoch: epochs done.
        best: best validation score so far.
        history: one dict per epoch (losses, validation metrics).
        training: optimiser, scheduler, scaler and RNG state (``last.pt`` only), or None.
        proposer: the 3D proposer (``noduledet.proposer``), {"spec": ..., "state": ...}, or None.
        stage2: the false-positive-reduction classifier, {"spec": ..., "state": ...}, or None.
        operating_points: {"fp_rates": [...], "thresholds": [...], "max_findings": [...], ...}
            from the validation scans (``noduledet.fpr.calibrate``), or None.
        path: where it was read from (None until saved or loaded).
    """

    variant: str
    spec: dict
    config: Config
    model: dict
    epoch: int = 0
    best: float = float("-inf")
    history: list = field(default_factory=list)
    training: dict | None = None
    proposer: dict | None = None
    stage2: dict | None = None
    operating_points: dict | None = None
    path: Path | None = None

    def to_dict(self) -> dict:
        out = {"format": FORMAT, "noduledet": __version__, "variant": self.variant, "spec": self.spec,
               "config": self.config.to_dict(), "model": self.model, "epoch": self.epoch, "best": self.best,
               "history": self.history}
        for key in ("training", "proposer", "stage2", "operating_points"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def without_training(self) -> Checkpoint:
        """The same checkpoint without the resume state (for ``best.pt``)."""
        return replace(self, training=None, path=None)


def load_weights(module: torch.nn.Module, state: dict, path: Path | None, what: str) -> None:
    """``module.load_state_dict(state)``, refused in one line when the weights do not fit."""
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0][:160]
        raise UserError(f"{path}: the weights do not fit {what} ({first})") from None


def save(checkpoint: Checkpoint, path: str | Path) -> None:
    """Write ``checkpoint`` to ``path`` atomically."""
    path = Path(path)
    atomic_write(path, lambda tmp: torch.save(checkpoint.to_dict(), tmp))
    checkpoint.path = path


def load(path: str | Path, map_location="cpu") -> Checkpoint:
    """Read a checkpoint written by ``save`` (weights only); refuse anything else in one line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint")
    try:
        raw = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated or foreign files raise many kinds of errors
        first = (str(err).strip().splitlines() or [""])[0][:120]
        raise UserError(f"{path}: not a readable checkpoint ({type(err).__name__}: {first})") from None
    if not isinstance(raw, dict) or "model" not in raw or "spec" not in raw:
        raise UserError(f"{path}: not a noduledet checkpoint (no model and spec)")
    found = raw.get("format", 1)
    if found != FORMAT:
        raise UserError(f"{path}: checkpoint format {found}, this noduledet {__version__} reads format {FORMAT}; "
                        f"retrain with this version (noduledet train)")
    stage2 = raw["config"].get("stage2") if isinstance(raw["config"], dict) else None
    if isinstance(stage2, dict):
        _fill_old_stage2(stage2, path)
    config = config_from_dict(raw["config"], f"{path} (its config)")
    return Checkpoint(raw["variant"], raw["spec"], config, raw["model"], raw["epoch"], raw["best"],
                      list(raw["history"]), raw.get("training"), raw.get("proposer"), raw.get("stage2"),
                      raw.get("operating_points"), path)


def _fill_old_stage2(stage2: dict, path: Path) -> None:
    """Give a checkpoint trained before the blob filter, the flips or the synthetic cubes the
    settings it was trained and calibrated with (``OLD_STAGE2``: none of them), and say so once."""
    missing = {k: v for k, v in OLD_STAGE2.items() if k not in stage2}
    if not missing:
        return
    stage2.update(missing)
    if path.resolve() not in _noted:
        _noted.add(path.resolve())
        print(f"noduledet: note: {path} predates {', '.join(f'stage2.{k}' for k in missing)}; it runs with "
              f"{', '.join(f'{k}={v:g}' for k, v in missing.items())} (off), as it was trained", file=sys.stderr)
