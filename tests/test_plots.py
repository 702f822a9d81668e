"""The pictures show the finding where it is, in the lung window (W1500/L-600), pixel for pixel."""

import numpy as np
import pytest
from PIL import Image

from noduledet import plots


def grey(hu: float) -> float:
    """The grey level (0-255) of ``hu`` in the lung window."""
    lo, hi = plots.LUNG_WINDOW
    return float(np.clip((hu - lo) / (hi - lo), 0, 1) * 255)


def test_a_candidate_picture_shows_its_finding_in_the_lung_window(tmp_path):
    plane = np.full((80, 100), -850, dtype=np.int16)  # lung
    yy, xx = np.mgrid[:80, :100]
    plane[(yy - 30) ** 2 + (xx - 40) ** 2 <= 36] = 40  # a solid nodule of 6 px radius, centred on voxel (30, 40)
    plane[:, 90:] = 400  # bone at the right edge
    whole, zoomed = plots.candidate(plane, (0.7, 0.7), (40.5, 30.5), 4.0, "a finding", tmp_path / "c.png")
    with Image.open(tmp_path / "c.png") as image:
        png = np.asarray(image.convert("L"), dtype=float)
    assert png.shape == (414, 810)  # 9 x 4.6 inches at 90 dpi
    assert whole[1] < png.shape[1] / 2 < zoomed[1]  # the whole slice left, the zoom right
    for row, col in (whole, zoomed):
        assert png[row, col] == pytest.approx(grey(40), abs=2)  # the nodule: 236, not [-1000, 400]'s 190
    row, col = zoomed
    assert png[row, col + 40] == pytest.approx(grey(-850), abs=2)  # 85: lung beside it (about 9 px of the slice)
    assert png[row, col + 40] < png[row, col] - 100


def test_a_slice_grid_shows_each_centre(tmp_path):
    planes = [np.full((48, 48), v, dtype=np.int16) for v in (-1000, -600, 150)]
    centres = plots.slice_grid([(p, (20.5, 10.5), 4.0, f"#{k}") for k, p in enumerate(planes)], tmp_path / "g.png",
                               columns=2)
    with Image.open(tmp_path / "g.png") as image:
        png = np.asarray(image.convert("L"), dtype=float)
    assert png.shape == (640, 640) and len(centres) == 3
    assert [png[r, c] for r, c in centres] == pytest.approx([grey(-1000), grey(-600), grey(150)], abs=2)
