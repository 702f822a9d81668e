"""The LUNA16 layout: ``subset0..9/<seriesuid>.mhd|.raw`` and the challenge CSVs.

```
ROOT/
  subset0/1.3.6...860.mhd, 1.3.6...860.raw, ...
  ...
  subset9/...
  annotations.csv           seriesuid,coordX,coordY,coordZ,diameter_mm
  annotations_excluded.csv  same columns; findings that count neither as hit nor as FP
  candidates_V2.csv         seriesuid,coordX,coordY,coordZ,class   (optional)
```

The CSVs may also sit in ``ROOT/CSVFILES/`` or ``ROOT/evaluationScript/annotations/``, where
the challenge's archives unpack them.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from noduledet.errors import UserError

ANNOTATION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
CANDIDATE_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "class")
PREDICTION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "probability")
CSV_DIRS = ("", "CSVFILES", "evaluationScript/annotations")
REFERENCE = Path(__file__).parent / "reference"


@dataclass
class Findings:
    """Rows of a LUNA16-style CSV: world centres and one value column.

    Attributes:
        uids: (N,) seriesuid per row.
        xyz: (N, 3) world x, y, z mm.
        value: (N,) the fifth column (diameter_mm, probability or class).
        source: the file read.
    """

    uids: np.ndarray
    xyz: np.ndarray
    value: np.ndarray
    source: str = ""
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.uids)

    def for_scan(self, uid: str) -> Findings:
        return self.select(self.uids == uid)

    def for_scans(self, uids) -> Findings:
        return self.select(np.isin(self.uids, list(uids)))

    def select(self, keep: np.ndarray) -> Findings:
        """The rows where ``keep`` (a bool mask or indices)."""
        return Findings(self.uids[keep], self.xyz[keep], self.value[keep], self.source,
                        {k: v[keep] for k, v in self.extra.items()})

    def scans(self) -> list[str]:
        return sorted(set(self.uids.tolist()))

    @classmethod
    def empty(cls, source: str = "") -> Findings:
        return cls(np.array([], dtype=str), np.zeros((0, 3)), np.zeros(0), source)


def read_findings(path: str | Path, columns: tuple[str, ...] = ANNOTATION_COLUMNS) -> Findings:
    """Read a LUNA16 CSV with ``columns`` (seriesuid, coordX, coordY, coordZ, <value>).

    Extra columns are kept in ``extra`` as strings. A missing file, missing columns or a
    non-numeric cell raise ``UserError`` naming the file (and line).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        if not header:
            raise UserError(f"{path}: empty file (expected the header {','.join(columns)})")
        header = [h.strip() for h in header]
        missing = [c for c in columns if c not in header]
        if missing:
            raise UserError(f"{path}: missing column(s) {missing}; found {header}; expected {list(columns)}")
        uids, xyz, value = [], [], []
        extra_cols = [h for h in header if h not in columns]
        extra: dict[str, list[str]] = {c: [] for c in extra_cols}
        for line, row in enumerate(reader, start=2):
            row = {(k or "").strip(): v for k, v in row.items()}
            try:
                xyz.append([float(row[c]) for c in columns[1:4]])
                value.append(float(row[columns[4]]))
            except (TypeError, ValueError):
                bad = next(c for c in columns[1:] if not _is_number(row.get(c)))
                raise UserError(f"{path}:{line}: {bad}={row.get(bad)!r} is not a number") from None
            uids.append(row["seriesuid"].strip())
            for c in extra_cols:
                extra[c].append(row.get(c) or "")
    return Findings(np.array(uids, dtype=str), np.array(xyz, dtype=float).reshape(-1, 3),
                    np.array(value, dtype=float), str(path), {k: np.array(v) for k, v in extra.items()})


def write_findings(path: str | Path, findings: Findings, value_column: str = "diameter_mm",
                   precision: int = 4) -> None:
    """Write ``seriesuid,coordX,coordY,coordZ,<value_column>`` (and extras) to ``path``:
    coordinates with ``precision`` decimals, the value with 6 significant digits; a NaN
    coordinate (unknown) as an empty cell."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extras = list(findings.extra)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seriesuid", "coordX", "coordY", "coordZ", value_column, *extras])
        for i in range(len(findings)):
            w.writerow([findings.uids[i], *("" if np.isnan(v) else f"{v:.{precision}f}" for v in findings.xyz[i]),
                        f"{findings.value[i]:.6g}", *(findings.extra[k][i] for k in extras)])


def _is_number(s) -> bool:
    try:
        float(s)
        return True
    except (TypeError, ValueError):
        return False


def read_uid_list(path: str | Path) -> list[str]:
    """One seriesuid per line (a header line ``seriesuid`` is skipped)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    uids = [line.split(",")[0].strip() for line in path.read_text().splitlines()]
    return [u for u in uids if u and u != "seriesuid"]


class Luna16:
    """Index of a LUNA16-layout folder (real LUNA16 or a phantom made by ``noduledet phantom``)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"{self.root}: no such folder")
        self.scans: dict[str, Path] = {}
        self.subset_of: dict[str, int] = {}
        for sub in sorted(self.root.glob("subset*")):
            m = re.fullmatch(r"subset(\d+)", sub.name)
            if not (m and sub.is_dir()):
                continue
            for mhd in sorted(sub.glob("*.mhd")):
                self.scans[mhd.stem] = mhd
                self.subset_of[mhd.stem] = int(m.group(1))
        if not self.scans:
            raise UserError(f"{self.root}: no scans (expected subset0..9/<seriesuid>.mhd, the LUNA16 layout)")

    @property
    def uids(self) -> list[str]:
        return sorted(self.scans)

    def scan_path(self, uid: str) -> Path:
        if uid not in self.scans:
            raise UserError(f"{self.root}: unknown seriesuid {uid}")
        return self.scans[uid]

    def csv_path(self, name: str, required: bool = True) -> Path | None:
        for d in CSV_DIRS:
            p = self.root / d / name
            if p.is_file():
                return p
        if required:
            raise UserError(f"{self.root}: no {name} (looked in {', '.join(repr(d or '.') for d in CSV_DIRS)})")
        return None

    def annotations(self) -> Findings:
        return read_findings(self.csv_path("annotations.csv"), ANNOTATION_COLUMNS)

    def excluded(self) -> Findings:
        """annotations_excluded.csv, or no rows when the file is absent."""
        p = self.csv_path("annotations_excluded.csv", required=False)
        return read_findings(p, ANNOTATION_COLUMNS) if p else Findings.empty()

    def candidates(self) -> Findings:
        p = self.csv_path("candidates_V2.csv", required=False) or self.csv_path("candidates.csv")
        return read_findings(p, CANDIDATE_COLUMNS)
