"""Shared by the tests of noduledet.clinical: external tools, and a small scanner-like series."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from noduledet.data.ct import CTVolume, write_dicom
from noduledet.geometry import Geometry


def require_tool(name: str, why: str) -> str:
    """The path of the program ``name``; skip the test without it, or fail under
    ``NODULEDET_REQUIRE_TOOLS=1`` (CI installs every tool and must not skip silently)."""
    path = shutil.which(name)
    if path:
        return path
    message = f"{name} not found on PATH ({why}); Debian: see .ci/run for the packages"
    if os.environ.get("NODULEDET_REQUIRE_TOOLS") == "1":
        pytest.fail(f"NODULEDET_REQUIRE_TOOLS=1 but {message}")
    pytest.skip(message)


def dciodvfy_errors(path: Path) -> list[str]:
    """The lines of dciodvfy's report on ``path`` that name an error (warnings are let through)."""
    tool = require_tool("dciodvfy", "the DICOM validator of dicom3tools")
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]


def rotated_volume(shape=(16, 64, 64)) -> CTVolume:
    """A small CT with a rotated, z-flipped direction (not its own transpose: catches row/column
    swaps), lung-like air, and two blobs; spacing differs on every axis."""
    th = 0.3
    c, s = np.cos(th), np.sin(th)
    direction = (c, -s, 0, s, c, 0, 0, 0, -1)  # det -1: slices go feet-ward as index grows
    hu = np.full(shape, -850, dtype=np.int16)
    hu[4:7, 20:28, 20:28] = 40
    hu[9:12, 36:46, 40:48] = 20
    return CTVolume(hu, Geometry((0.7, 0.8, 2.5), (-120.5, 40.25, -30.0), direction, shape))


def write_scanner_series(folder: Path, volume: CTVolume | None = None) -> list[Path]:
    """``volume`` as a DICOM series with a patient and study filled in, whose file names follow
    neither slice order, so that whatever reads by name order gets it wrong."""
    paths = write_dicom(volume or rotated_volume(), folder)
    out = []
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientBirthDate = "Phantom^Tiny", "19600101"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20240102", "101500", "A1"
        target = path.with_name(f"img{(5 * k) % len(paths):03d}.dcm")  # 5 is prime to 16
        ds.save_as(target, enforce_file_format=True)
        path.unlink()
        out.append(target)
    return out
