"""``noduledet lidc-annotations``: LUNA16's list derived from LIDC-IDRI, checked against LUNA16."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from noduledet.data.ct import read_mhd_geometry
from noduledet.data.lidc import DerivedNodule, LidcDatabase, compare_with_reference, derive_luna16
from noduledet.data.luna16 import REFERENCE, Findings, Luna16, read_findings, read_uid_list, write_findings
from noduledet.errors import UserError
from noduledet.staging import atomic_write, write_json


def world_xy(nodule: DerivedNodule, data: Luna16 | None) -> tuple[float, float] | None:
    """World x, y of a derived nodule from its scan's .mhd header, when the scan is there."""
    if data is None or nodule.uid not in data.scans:
        return None
    g = read_mhd_geometry(data.scans[nodule.uid])
    x, y, _ = g.voxel_to_world([g.slice_index(nodule.z_mm), nodule.y_px, nodule.x_px])
    return float(x), float(y)


def run(out: Path, data: Path | None = None, reference: Path | None = None, scans: Path | None = None,
        include_outline: bool = False, force: bool = False, progress=None) -> dict:
    """Write the derived list to ``out`` and print (and return) its comparison with the reference.

    Columns: seriesuid, coordX, coordY, coordZ, diameter_mm, readers, pixelX, pixelY. coordX and
    coordY need the scan's geometry (``data``); without it they are left empty.
    """
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out}: exists; pass --force to replace it")
    luna = Luna16(data) if data else None
    uids = read_uid_list(scans) if scans else None
    derived = derive_luna16(LidcDatabase(outline=include_outline), uids, progress=progress)
    placed = [world_xy(d, luna) for d in derived]
    extra = {"readers": np.array([str(d.readers) for d in derived]),
             "pixelX": np.array([f"{d.x_px:.2f}" for d in derived]),
             "pixelY": np.array([f"{d.y_px:.2f}" for d in derived])}
    xyz = np.array([[p[0], p[1], d.z_mm] if p else [np.nan, np.nan, d.z_mm] for d, p in zip(derived, placed)])
    ref = read_findings(reference or REFERENCE / "luna16_annotations.csv")
    report = compare_with_reference(derived, ref)
    write_json(out.with_suffix(".check.json"), report)  # before the list: the list's presence means both are whole
    atomic_write(out, lambda tmp: write_findings(tmp, Findings(
        np.array([d.uid for d in derived], dtype=str), xyz.reshape(-1, 3), np.array([d.diameter_mm for d in derived]),
        "", extra)))
    missing = sum(p is None for p in placed)
    print(f"wrote {len(derived)} nodules to {out}" + (f" ({missing} without world x, y: pass --data)" if missing else ""))
    print(f"reference {ref.source}: {report['reference']} nodules; derived {report['derived']} "
          f"({100 * report['count_difference']:+.2f}%)")
    print(f"matched within {report['z_tolerance_mm']} mm in z: {report['matched']} "
          f"({100 * report['matched_fraction']:.2f}%), mean |dz| {report['mean_abs_dz_mm']:.3f} mm")
    print(f"diameter (volume-equivalent, mean of readers) vs reference: mean |diff| "
          f"{report['diameter_mean_abs_diff_mm']:.3f} mm, median {report['diameter_median_abs_diff_mm']:.3f} mm, "
          f"mean ratio {report['diameter_mean_ratio']:.4f}, correlation {report['diameter_correlation']:.4f}")
    return report
