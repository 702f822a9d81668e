"""What kind each nodule is, where the data record it: ``annotations_kinds.csv`` beside annotations.csv.

```
seriesuid,coordX,coordY,coordZ,diameter_mm,location,texture
1.2.826.0.1...,-91.2051,33.0172,-120.5000,5.31,pleural,ground-glass
```

- location: ``free`` (in the lung, touching neither wall nor vessel), ``pleural`` (touching the
  pleura), ``vascular`` (touching a vessel);
- texture: ``solid``, ``part-solid`` (a solid core in ground glass), ``ground-glass``.

A row describes the annotation of ``annotations.csv`` at the same place in the same scan (within
``MATCH_MM``). Our phantom and ``benchmarks/foreign_phantom.py`` write the file; LUNA16 has none,
and then nothing is reported by kind. Sizes need no file: ``noduledet.metrics.froc.SIZE_BINS``
groups the diameters.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from noduledet.data.luna16 import ANNOTATION_COLUMNS, Findings, Luna16, read_findings, write_findings
from noduledet.errors import UserError

KINDS_CSV = "annotations_kinds.csv"
LOCATIONS = ("free", "pleural", "vascular")
TEXTURES = ("solid", "part-solid", "ground-glass")
MATCH_MM = 0.05  # the CSVs' coordinates carry 4 decimals


def read_kinds(path: str | Path) -> Findings:
    """``annotations_kinds.csv``: the annotation columns plus ``location`` and ``texture`` (in
    ``extra``); a missing column or an unknown value raises ``UserError`` naming the file and line."""
    rows = read_findings(path, ANNOTATION_COLUMNS)
    for column, allowed in (("location", LOCATIONS), ("texture", TEXTURES)):
        if column not in rows.extra:
            raise UserError(f"{path}: missing column {column!r}; expected {list(ANNOTATION_COLUMNS) + ['location', 'texture']}")
        values = np.char.strip(rows.extra[column].astype(str))
        bad = np.nonzero(~np.isin(values, allowed))[0]
        if len(bad):
            raise UserError(f"{path}:{bad[0] + 2}: {column}={str(values[bad[0]])!r}; choose from {list(allowed)}")
        rows.extra[column] = values
    return rows


def write_kinds(path: str | Path, findings: Findings) -> None:
    """Write ``findings`` (diameters, with ``extra`` ``location`` and ``texture``) as ``annotations_kinds.csv``."""
    write_findings(path, Findings(findings.uids, findings.xyz, findings.value, findings.source,
                                  {"location": findings.extra["location"], "texture": findings.extra["texture"]}))


def kinds_of(annotations: Findings, kinds: Findings) -> dict[str, np.ndarray]:
    """The location and texture of each row of ``annotations``: {"location": (N,), "texture": (N,)}.

    Raises ``UserError`` naming the first annotation that no row of ``kinds`` describes."""
    out = {"location": np.empty(len(annotations), dtype=object), "texture": np.empty(len(annotations), dtype=object)}
    for i, (uid, xyz) in enumerate(zip(annotations.uids, annotations.xyz)):
        same = np.nonzero((kinds.uids == uid) & (np.abs(kinds.xyz - xyz).max(axis=1) <= MATCH_MM))[0]
        if not len(same):
            raise UserError(f"{kinds.source}: no row for the nodule of {uid} at ({', '.join(f'{v:.2f}' for v in xyz)}) "
                            f"of {annotations.source or 'annotations.csv'}")
        for column in out:
            out[column][i] = kinds.extra[column][same[0]]
    return {k: v.astype(str) for k, v in out.items()}


def annotation_kinds(data: Luna16) -> dict[str, np.ndarray] | None:
    """``kinds_of`` the folder's annotations, or None when it has no ``annotations_kinds.csv``."""
    path = data.csv_path(KINDS_CSV, required=False)
    return kinds_of(data.annotations(), read_kinds(path)) if path else None
