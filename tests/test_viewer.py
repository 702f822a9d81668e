"""The offline viewer, opened in a real browser: headless Chromium driven by selenium."""

import base64
import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from noduledet.clinical.viewer import ViewerScan, finding_box, kept_slices, lung_window, write_viewer
from noduledet.data.phantom import make_scan
from tests.clinical_helpers import require_tool

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "images" / "viewer.png"


def _phantom_scan() -> ViewerScan:
    """A 128 x 128 x 40 phantom scan whose three nodules (slices 8, 29, 25) are its candidates,
    written the way predict writes them."""
    p = make_scan(seed=3, index=0, size=128, nodules=(3, 3), diameters=(6.0, 16.0), slices=40, flip_fraction=0.0)
    assert len(p.nodules) == 3, "the phantom generator changed: pick another seed"
    g = p.volume.geometry
    candidates = [{"world_xyz": [float(v) for v in n.center_xyz],
                   "voxel_zyx": [float(v) for v in g.world_to_voxel(n.center_xyz)],
                   "diameter_mm": round(n.diameter_mm, 2), "probability": prob}
                  for n, prob in zip(p.nodules, (0.94, 0.81, 0.57))]
    return ViewerScan(p.uid, p.volume.hu, g.spacing, candidates)


def _small_scan() -> ViewerScan:
    """A second, smaller scan with one candidate where the detector happened to put it."""
    p = make_scan(seed=3, index=1, size=64, nodules=(0, 0), slices=16, flip_fraction=0.0)
    g = p.volume.geometry
    voxel = [8.0, 30.0, 20.0]
    candidate = {"voxel_zyx": voxel, "world_xyz": g.voxel_to_world(voxel).tolist(), "diameter_mm": 5.0,
                 "probability": 0.42}
    return ViewerScan(p.uid, p.volume.hu, g.spacing, [candidate])


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    scans = [_phantom_scan(), _small_scan()]
    return scans, write_viewer(scans, tmp_path_factory.mktemp("viewer"), margin=2)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium = require_tool("chromium", "the browser for the viewer test, Debian package chromium")
    driver_path = require_tool("chromedriver", "drives Chromium, Debian package chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.add_argument("--window-size=1150,900")
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_lung_window_and_kept_slices():
    np.testing.assert_array_equal(lung_window(np.array([-1350, -600, 150, 3000])), [0, 128, 255, 255])
    assert kept_slices([1, 3, 20], depth=21, margin=2) == [0, 1, 2, 3, 4, 5, 18, 19, 20]


def test_page_is_self_contained_and_keeps_only_slices_near_findings(page):
    scans, path = page
    text = path.read_text()
    assert not re.search(r"\b(https?|ftp|wss?):", text, re.IGNORECASE)  # no URL (base64 has no ':')
    assert not re.search(r"""\b(src|href)\s*=\s*["'](?!data:)""", text) and "<link" not in text
    assert "default-src 'none'" in text  # the page's CSP forbids any fetch but data: images
    stored = re.findall(r'"(\d+)":"data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    centres = [int(round(c["voxel_zyx"][0])) for s in scans for c in s.candidates]
    assert len(stored) == len(kept_slices(centres[:3], 40, 2)) + len(kept_slices(centres[3:], 16, 2)) < 40 + 16
    k, png = stored[0]  # the first slice of the first scan, in the lung window, pixel for pixel
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(png)))),
                                  lung_window(scans[0].hu[int(k)]))


def _section(driver, index):
    from selenium.webdriver.support.ui import WebDriverWait

    section = driver.find_element("id", f"scan-{index}")
    WebDriverWait(driver, 10).until(lambda d: section.get_attribute("data-ready") == "1")
    return section


def _redness(driver, index, x, y):
    """Most red (R - max(G, B)) of the canvas pixels within 1 px of (x, y)."""
    return driver.execute_script("""
        const c = document.querySelector(`#scan-${arguments[0]} canvas`).getContext('2d');
        const d = c.getImageData(arguments[1] - 1, arguments[2] - 1, 3, 3).data; let best = -255;
        for (let i = 0; i < d.length; i += 4) best = Math.max(best, d[i] - Math.max(d[i + 1], d[i + 2]));
        return best;""", index, int(x), int(y))


@pytest.mark.slow  # a real browser: `python -m pytest -m slow`
def test_click_second_finding_then_step_down(browser, page):
    from selenium.webdriver.common.keys import Keys

    scans, path = page
    browser.get(path.as_uri())
    first = _section(browser, 0)
    second = scans[0].candidates[1]
    z = int(round(second["voxel_zyx"][0]))
    x1, y1, x2, y2 = finding_box(second["voxel_zyx"], second["diameter_mm"], scans[0].spacing_xyz)
    top_edge = ((x1 + x2) / 2, y1)
    assert _redness(browser, 0, *top_edge) < 60  # finding 1 is shown: no red box there yet
    first.find_elements("css selector", "li.finding")[1].click()
    first = _section(browser, 0)
    assert (first.get_attribute("data-slice"), first.get_attribute("data-finding")) == (str(z), "2")
    assert [float(v) for v in first.get_attribute("data-box").split(",")] == [x1, y1, x2, y2]
    # the box is drawn, in the selected colour: a 1 px line at a fractional position may cover two
    # pixels by half, whose redness is then about 100 (the absent box's stays below 60)
    assert _redness(browser, 0, *top_edge) > 80
    if os.environ.get("NODULEDET_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(SCREENSHOT))
    browser.find_element("tag name", "body").send_keys(Keys.ARROW_DOWN)
    first = _section(browser, 0)
    assert first.get_attribute("data-slice") == str(z + 1)
    assert _section(browser, 1).get_attribute("data-slice") == str(int(round(scans[1].candidates[0]["voxel_zyx"][0])))
