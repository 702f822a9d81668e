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


def read_findings(path: str | Path, columns: tuple[str, ...] = ANNOTATION_COLUMNS,
                  unknown_diameter: bool = False) -> Findings:
    """Read a LUNA16 CSV with ``columns`` (seriesuid, coordX, coordY, coordZ, <value>).

    Columns are found by name, in any order; extra columns are kept in ``extra`` as strings.
    A missing file, missing columns, a row of too few or too many cells, a cell that is not a
    finite number, or a ``diameter_mm`` that is not positive raise ``UserError`` naming the
    file and line.

    Args:
        unknown_diameter: allow a negative ``diameter_mm``, LUNA16's mark (-1) of a finding
            without one (annotations_excluded.csv).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        return _read_findings(path, columns, unknown_diameter)
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not a text CSV (byte {err.start} is not UTF-8)") from None


def _read_findings(path: Path, columns: tuple[str, ...], unknown_diameter: bool) -> Findings:
    uids, xyz, value = [], [], []
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
        reader = csv.DictReader(f)
        header = [(h or "").strip() for h in reader.fieldnames or []]
        if not header:
            raise UserError(f"{path}: empty file (expected the header {','.join(columns)})")
        missing = [c for c in columns if c not in header]
        if missing:
            raise UserError(f"{path}: missing column(s) {missing}; found {header}; expected {list(columns)}")
        reader.fieldnames = header
        extra: dict[str, list[str]] = {c: [] for c in header if c not in columns}
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row.values() or None in row:  # DictReader's marks of a short and a long row
                raise UserError(f"{where}: {'fewer' if None in row.values() else 'more'} cells than the "
                                f"{len(header)} of the header")
            numbers = [_number(where, c, row[c]) for c in columns[1:5]]
            if columns[4] == "diameter_mm" and not (numbers[3] > 0 or (unknown_diameter and numbers[3] < 0)):
                raise UserError(f"{where}: diameter_mm={row['diameter_mm'].strip()}; a nodule's diameter is positive"
                                + (" (-1: unknown)" if unknown_diameter else ""))
            uids.append(row["seriesuid"].strip())
            xyz.append(numbers[:3])
            value.append(numbers[3])
            for c in extra:
                extra[c].append(row[c])
    return Findings(np.array(uids, dtype=str), np.array(xyz, dtype=float).reshape(-1, 3),
                    np.array(value, dtype=float), str(path), {k: np.array(v) for k, v in extra.items()})


def _number(where: str, column: str, cell: str) -> float:
    """A cell as a finite float, or a ``UserError`` naming the line and column."""
    try:
        v = float(cell)
    except ValueError:
        raise UserError(f"{where}: {column}={cell!r} is not a number") from None
    if not np.isfinite(v):
        raise UserError(f"{where}: {column}={cell.strip()} is not a finite number")
    return v


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


def read_uid_list(path: str | Path) -> list[str]:
    """One seriesuid per line (a header line ``seriesuid`` is skipped)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not a text list of seriesuids (byte {err.start} is not UTF-8)") from None
    uids = [line.split(",")[0].strip() for line in lines]
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
        return read_findings(p, ANNOTATION_COLUMNS, unknown_diameter=True) if p else Findings.empty()

    def candidates(self) -> Findings:
        p = self.csv_path("candidates_V2.csv", required=False) or self.csv_path("candidates.csv")
        return read_findings(p, CANDIDATE_COLUMNS)
