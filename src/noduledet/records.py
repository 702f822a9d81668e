"""The JSON records that the verbs pass between them: one writer and one reader per format.

```
RUN/splits.json        {"train": [...], "val": [...], "test": [...]} scan ids    train writes; evaluate, stage2,
                                                                                  demo, compare read
RUN/meta.json          how the run was made: versions, seed, device, git hash    train writes; stage2 adds to it
OUT/run.json           a predict run: its manifest, checkpoint, settings, shard  predict writes; --resume, gather read
OUT/<name>/scan.json   one scan's summary and candidates                         predict writes; merge, gather, demo read
```

Every writer is atomic (``staging``); every reader refuses a missing or malformed file in one
line that names it (``UserError``).
"""

from __future__ import annotations

import json
from pathlib import Path

from noduledet.errors import UserError
from noduledet.staging import write_json

SPLITS, META, RUN, SCAN = "splits.json", "meta.json", "run.json", "scan.json"
SPLIT_NAMES = ("train", "val", "test")


def _read(path: Path, what: str) -> dict:
    """The JSON object in ``path``; a missing file, bad JSON or another type is a ``UserError``."""
    if not path.is_file():
        raise UserError(f"{path}: missing (no {what})")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object ({what}), got {type(value).__name__}")
    return value


def write_splits(run_dir: str | Path, splits: dict[str, list[str]]) -> None:
    """``RUN/splits.json``: the run's train, val and test scan ids."""
    write_json(Path(run_dir) / SPLITS, {k: list(splits[k]) for k in SPLIT_NAMES})


def read_splits(run_dir: str | Path) -> dict[str, list[str]]:
    """``RUN/splits.json`` as {"train", "val", "test"} -> scan ids; each a list of strings."""
    path = Path(run_dir) / SPLITS
    raw = _read(path, "train/val/test split of a training run")
    out = {}
    for name in SPLIT_NAMES:
        ids = raw.get(name)
        if not isinstance(ids, list) or not all(isinstance(u, str) for u in ids):
            raise UserError(f"{path}: {name!r} must be a list of scan ids")
        out[name] = ids
    return out


def write_meta(run_dir: str | Path, meta: dict) -> None:
    """``RUN/meta.json``: how the run was made."""
    write_json(Path(run_dir) / META, meta)


def read_meta(run_dir: str | Path) -> dict:
    """``RUN/meta.json``; {} for a run folder without one (copied by hand, say)."""
    path = Path(run_dir) / META
    return _read(path, "run metadata") if path.exists() else {}


def write_run_record(out: str | Path, record: dict) -> None:
    """``OUT/run.json`` of a predict run (``batch.run_record`` builds it)."""
    write_json(Path(out) / RUN, record)


def read_run_record(out: str | Path) -> dict:
    """``OUT/run.json``; a folder without one is not a predict output."""
    path = Path(out) / RUN
    if not path.is_file():
        raise UserError(f"{out}: not a predict output (no {RUN})")
    return _read(path, "predict run")


def write_scan_record(folder: str | Path, summary: dict, candidates: list[dict]) -> None:
    """``OUT/<name>/scan.json``: the scan's summary and its candidates (``Candidate.to_dict``)."""
    write_json(Path(folder) / SCAN, {**summary, "candidates": candidates})


def scan_done(folder: str | Path) -> bool:
    """True when the scan's folder is complete: its ``scan.json`` is written last."""
    return (Path(folder) / SCAN).is_file()


def read_scan_record(folder: str | Path) -> tuple[dict, list[dict]]:
    """``OUT/<name>/scan.json`` as (summary, candidates most probable first)."""
    path = Path(folder) / SCAN
    raw = _read(path, "scan record of noduledet predict")
    candidates = raw.pop("candidates", None)
    if not isinstance(candidates, list):
        raise UserError(f"{path}: no list of candidates")
    return raw, candidates
