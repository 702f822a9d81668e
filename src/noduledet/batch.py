"""The scans of a ``predict`` run and its output folder: resumable, shardable, gathered.

```
OUT/run.json           the manifest (every scan's path and name, sorted by name), the checkpoint
                       and its digest, the settings and options, the shard: written at the start
OUT/<name>/            one folder per finished scan, renamed into place when complete
OUT/failed/<name>.txt  why a scan could not be predicted (the run goes on; --resume tries it again)
OUT/candidates.csv     every finished scan's candidates ...
OUT/summary.json       ... and status, rebuilt from the scans' folders at the end
OUT/findings.csv       each scan's findings: its candidates at or above the findings' threshold, at
                       most max_findings (``predict.choose_findings`` picks them)
```

A run killed at any point keeps the scans it finished; ``--resume`` with the same command skips
them (and refuses when the checkpoint, settings, manifest or shard differ), and the merged files
are rebuilt from the folders. ``--shard I/N`` takes every N-th scan of the manifest from the I-th
(I = 0..N-1: a job array's task id), and ``noduledet gather`` merges the shards' folders.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from noduledet import __version__
from noduledet.data.ct import ct_kind
from noduledet.data.luna16 import PREDICTION_COLUMNS, Findings, read_findings, write_findings
from noduledet.errors import UserError
from noduledet.records import RUN, read_run_record, read_scan_record, scan_done, write_run_record
from noduledet.staging import atomic_write, refuse_existing, staged_dir, write_json

SAME = ("checkpoint_sha1", "settings", "options", "names", "shard")  # what a resumed run must share


@dataclass
class ScanInput:
    path: Path
    name: str  # seriesuid for LUNA16, DICOM and MetaImage inputs; file name stem for NIfTI


def _dicom_series_uid(folder: Path) -> str | None:
    import pydicom

    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            return str(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID)
        except Exception:  # not DICOM: try the next file
            continue
    return None


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".mhd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _scans_in(p: Path) -> list[ScanInput]:
    if not p.exists():
        raise UserError(f"{p}: no such file or folder")
    if p.is_dir():
        luna = sorted(p.glob("subset*/*.mhd"))
        files = sorted(f for f in p.iterdir() if f.is_file() and ct_kind(f) in ("mhd", "nifti"))
        if luna or files:
            return [ScanInput(f, _stem(f)) for f in (luna or files)]
        return [ScanInput(p, _dicom_series_uid(p) or p.name)]
    if ct_kind(p) in ("mhd", "nifti"):
        return [ScanInput(p, _stem(p))]
    raise UserError(f"{p}: unknown CT format (expected .mhd, .nii, .nii.gz, a DICOM folder or a LUNA16 root)")


def read_manifest(path: str | Path) -> list[Path]:
    """The scans listed in a manifest: one path per line (relative to the manifest's folder),
    blank lines and ``#`` comments ignored; a line naming nothing is refused with its number."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such manifest")
    out = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        p = Path(line) if Path(line).is_absolute() else path.parent / line
        if not p.exists():
            raise UserError(f"{path}:{number}: {line}: no such file or folder")
        out.append(p)
    return out


def expand_inputs(paths: list[str | Path]) -> list[ScanInput]:
    """Every scan named by ``paths`` (files, DICOM folders, folders of scans, LUNA16 roots),
    sorted by name; two scans of one name (the same scan as mhd and DICOM, say) keep apart."""
    out = sorted((s for p in map(Path, paths) for s in _scans_in(p)), key=lambda s: (s.name, str(s.path)))
    if not out:
        raise UserError("no scans among the inputs")
    seen: dict[str, int] = {}
    for s in out:
        seen[s.name] = seen.get(s.name, 0) + 1
        if seen[s.name] > 1:
            s.name = f"{s.name}_{seen[s.name]}"
    return out


def parse_shard(text: str) -> tuple[int, int]:
    """``I/N`` -> (I, N) with 0 <= I < N."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text!r}: expected I/N, e.g. 0/10 (I from 0 to N-1)") from None
    if n < 1:
        raise UserError(f"--shard {text}: N must be at least 1")
    if not 0 <= i < n:
        raise UserError(f"--shard {text}: I must be from 0 to {n - 1}")
    return i, n


def file_sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_record(checkpoint: Path, settings: dict, options: dict, scans: list[ScanInput],
               shard: tuple[int, int] | None) -> dict:
    """What ``run.json`` holds (the whole manifest, also in a shard)."""
    return {"noduledet": __version__, "checkpoint": str(checkpoint), "checkpoint_sha1": file_sha1(checkpoint),
            "settings": settings, "options": options, "names": [s.name for s in scans],
            "paths": [str(s.path) for s in scans], "shard": list(shard) if shard else None}


def open_run(out: Path, record: dict, force: bool, resume: bool) -> None:
    """Create ``out`` with its ``run.json`` or, resuming, check that it is this run's."""
    if resume and (out / RUN).is_file():
        old = read_run_record(out)
        differs = [k for k in SAME if old.get(k) != record[k]]
        if differs:
            raise UserError(f"{out}: a run with other {', '.join(differs)}; resume it with the same checkpoint, "
                            f"inputs and options, or pass --force to start afresh")
        return
    empty = out.is_dir() and not any(out.iterdir())  # killed between making it and writing run.json
    refuse_existing(out, force or (resume and empty))
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    write_run_record(out, record)


def done(out: Path, name: str) -> bool:
    """True when the scan's folder is complete (it appears only so)."""
    return scan_done(out / name)


def record_failure(out: Path, name: str, message: str | None) -> None:
    """Note why scan ``name`` failed (``None``: it succeeded, forget an earlier failure)."""
    path = out / "failed" / f"{name}.txt"
    if message is None:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(message + "\n"))


def failures(out: Path, names: list[str]) -> dict[str, str]:
    """The recorded reasons of the scans among ``names`` that are not done."""
    return {n: (out / "failed" / f"{n}.txt").read_text().strip() for n in names
            if not done(out, n) and (out / "failed" / f"{n}.txt").is_file()}


def merge(folders: list[Path], out: Path, threshold: float, max_findings: int = 0) -> list[dict]:
    """``candidates.csv``, ``summary.json`` and ``findings.csv`` (per scan its candidates at or
    above ``threshold``, at most ``max_findings`` of them, 0: all) in ``out`` from finished scans'
    folders; return the summaries."""
    summaries, tables, kept = [], [Findings.empty()], [Findings.empty()]
    for folder in folders:
        summaries.append(read_scan_record(folder)[0])
        tables.append(read_findings(folder / "candidates.csv", PREDICTION_COLUMNS))
        order = np.argsort(-tables[-1].value, kind="stable")
        order = order[tables[-1].value[order] >= threshold][:max_findings or None]
        kept.append(tables[-1].select(np.sort(order)))
    table, findings = (Findings(np.concatenate([t.uids for t in ts]), np.concatenate([t.xyz for t in ts]).reshape(-1, 3),
                                np.concatenate([t.value for t in ts])) for ts in (tables, kept))
    atomic_write(out / "candidates.csv", lambda tmp: write_findings(tmp, table, "probability"))
    atomic_write(out / "findings.csv", lambda tmp: write_findings(tmp, findings, "probability"))
    write_json(out / "summary.json", summaries)
    return summaries


def gather(shards: list[str | Path], out: str | Path, force: bool = False, allow_missing: bool = False,
           log=print) -> list[dict]:
    """Merge the shards of one run into ``out``: one CSV and summary, the missing scans named."""
    shards, out = [Path(s) for s in shards], Path(out)
    records = [read_run_record(s) for s in shards]
    for s, r in zip(shards[1:], records[1:]):
        differs = [k for k in SAME[:-1] if r.get(k) != records[0].get(k)]
        if differs:
            raise UserError(f"{s}: another run than {shards[0]} (other {', '.join(differs)})")
    names = records[0]["names"]
    found = {n: s / n for n in names for s in shards if done(s, n)}
    missing = [n for n in names if n not in found]
    if missing and not allow_missing:
        raise UserError(f"{len(missing)} of {len(names)} scans are in no shard ({', '.join(missing[:3])}"
                        f"{', ...' if len(missing) > 3 else ''}); resume their shards, or pass --allow-missing")
    options = records[0]["options"]
    with staged_dir(out, force) as tmp:
        write_run_record(tmp, {**records[0], "shard": None, "gathered_from": [str(s) for s in shards],
                               "missing": missing})
        summaries = merge([found[n] for n in names if n in found], tmp, options["threshold"], options["max_findings"])
    if log:
        log(f"gathered {len(found)} of {len(names)} scans from {len(shards)} shards into {out}"
            + (f"; missing: {', '.join(missing)}" if missing else ""))
    return summaries
