"""A round trip through a real PACS: Orthanc with its DICOMweb plugin, started on a free localhost
port with its own storage folder, and stopped after the tests."""

import json
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests

from noduledet.clinical import Finding
from noduledet.clinical.dicomweb import fetch_series, find_series, store_files
from noduledet.clinical.source import read_series_headers
from noduledet.clinical.sr import read_sr, write_sr
from noduledet.data.ct import read_dicom
from noduledet.errors import UserError
from tests.clinical_helpers import require_tool, write_scanner_series

PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc"))
REFUSED_STUDY = "1.2.826.0.1.3680043.8.498.999"  # the test PACS refuses any upload to this study
REFUSE_LUA = """
function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)
  return not (method == 'POST' and string.find(uri, '/studies/%s', 1, true))
end
""" % REFUSED_STUDY


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dicomweb_plugin() -> Path:
    found = [p for d in PLUGIN_DIRS for p in sorted(d.glob("libOrthancDicomWeb.so*"))]
    if not found:
        require_tool("libOrthancDicomWeb.so", "Orthanc's DICOMweb plugin, Debian package orthanc-dicomweb")
    return found[0]


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"Orthanc exited ({proc.returncode}): {log.read_text(errors='replace')[-2000:]}")
        try:
            if requests.get(f"{url}/studies", timeout=2).status_code == 200:
                return
        except requests.exceptions.ConnectionError:
            pass
        time.sleep(0.2)
    pytest.fail(f"Orthanc not ready after {seconds} s: {log.read_text(errors='replace')[-2000:]}")


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """The DICOMweb URL of a fresh Orthanc (http://127.0.0.1:<port>/dicom-web)."""
    orthanc = require_tool("Orthanc", "the test PACS, Debian package orthanc")
    root = tmp_path_factory.mktemp("orthanc")
    (root / "refuse.lua").write_text(REFUSE_LUA)
    port = _free_port()
    config = {"Name": "noduledet-test", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
              "HttpPort": port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
              "DicomServerEnabled": False, "Plugins": [str(_dicomweb_plugin())],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "LuaScripts": [str(root / "refuse.lua")]}
    (root / "orthanc.json").write_text(json.dumps(config))
    log = root / "orthanc.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([orthanc, str(root / "orthanc.json")], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/dicom-web"
    try:
        _wait_ready(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def uploaded(pacs, tmp_path_factory):
    """A small scanner-like series stored in the PACS: (its folder, its study UID, its series UID)."""
    folder = tmp_path_factory.mktemp("upload") / "ct"
    paths = write_scanner_series(folder)
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    assert len(store_files(pacs, paths)) == len(paths)
    return folder, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


@pytest.mark.slow  # a real Orthanc: `python -m pytest -m slow`
def test_series_goes_through_the_pacs_and_its_report_comes_back(pacs, uploaded, tmp_path):
    folder, study, series = uploaded
    fetched = fetch_series(pacs, study, tmp_path / "fetched")
    original, back = read_dicom(folder), read_dicom(fetched)
    np.testing.assert_array_equal(back.hu, original.hu)
    assert back.geometry == original.geometry
    findings = [Finding(1, (-110.25, 52.5, -41.0), 9.5, 0.87, 310.0), Finding(2, (-95.0, 61.75, -48.5), 5.25, 0.55)]
    sr = write_sr(findings, read_series_headers(fetched), tmp_path / "sr.dcm")
    assert store_files(pacs, [sr]) == [pydicom.dcmread(sr).SOPInstanceUID]
    reports = find_series(pacs, study, modality="SR")
    assert len(reports) == 1 and reports[0].instances == 1
    assert [s.uid for s in find_series(pacs, study, modality="CT")] == [series]
    got = fetch_series(pacs, study, tmp_path / "report", series=reports[0].uid)
    assert read_sr(next(got.iterdir())) == findings
    again = fetch_series(pacs, study, tmp_path / "again")  # with an SR beside it, the CT is still the one chosen
    assert {p.name for p in again.iterdir()} == {p.name for p in fetched.iterdir()}


def _one_line_error(call, match: str) -> str:
    with pytest.raises(UserError, match=match) as err:
        call()
    assert "\n" not in str(err.value)
    return str(err.value)


def test_unreachable_server_is_one_line(tmp_path):
    url = f"http://127.0.0.1:{_free_port()}/dicom-web"  # nothing listens there
    _one_line_error(lambda: fetch_series(url, "1.2.3", tmp_path / "x"), "server unreachable")
    _one_line_error(lambda: store_files(url, write_scanner_series(tmp_path / "ct")[:1]), "server unreachable")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x*"))


@pytest.mark.slow  # a real Orthanc: `python -m pytest -m slow`
def test_unknown_study_and_series_are_named(pacs, uploaded, tmp_path):
    _, study, _ = uploaded
    _one_line_error(lambda: fetch_series(pacs, "1.2.3.4.5", tmp_path / "x"), r"study 1\.2\.3\.4\.5 not found")
    _one_line_error(lambda: fetch_series(pacs, study, tmp_path / "x", series="1.2.3.9"), r"series 1\.2\.3\.9 not found")
    assert list(tmp_path.iterdir()) == []  # no folder, no partial download


@pytest.mark.slow  # a real Orthanc: `python -m pytest -m slow`
def test_refused_upload_reports_the_server_status_and_stores_nothing(pacs, tmp_path):
    paths = write_scanner_series(tmp_path / "ct")[:2]
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = REFUSED_STUDY
        ds.save_as(path)
    _one_line_error(lambda: store_files(pacs, paths), r"upload of 2 file\(s\) to study .* refused: HTTP 403")
    _one_line_error(lambda: find_series(pacs, REFUSED_STUDY), "not found")


@pytest.mark.slow  # a real Orthanc: `python -m pytest -m slow`
def test_predict_reads_from_the_pacs_and_stores_its_report_there(pacs, phantom_root, random_checkpoint, tmp_path,
                                                                   capsys):
    """A phantom scan as a DICOM series goes into the PACS; noduledet predict --dicomweb fetches it,
    predicts and stores the SR back; the SR found in the PACS holds the findings of a run on the file."""
    from noduledet.cli import main
    from noduledet.data.ct import read_ct, write_dicom
    from noduledet.data.luna16 import Luna16

    data = Luna16(phantom_root)
    volume = read_ct(data.scan_path(data.uids[0]))
    paths = write_dicom(volume, tmp_path / "ct")
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
    store_files(pacs, paths)
    options = ["--checkpoint", str(random_checkpoint), "--score-threshold", "0.3", "--no-pictures"]
    assert main(["predict", str(tmp_path / "ct"), "-o", str(tmp_path / "file"), *options]) == 0
    local = read_sr(tmp_path / "file" / series / "sr.dcm")
    scan = json.loads((tmp_path / "file" / series / "scan.json").read_text())
    assert 0 < len(local) == sum(c["probability"] >= 0.3 for c in scan["candidates"])
    capsys.readouterr()
    assert main(["predict", "--dicomweb", pacs, "--study", study, "-o", str(tmp_path / "pacs"), "--store", *options]) == 0
    assert "stored 1 object(s)" in capsys.readouterr().out
    reports = find_series(pacs, study, modality="SR")
    assert len(reports) == 1
    got = read_sr(next(fetch_series(pacs, study, tmp_path / "sr", series=reports[0].uid).iterdir()))
    assert len(got) == len(local)
    for a, b in zip(got, local):
        assert np.allclose(a.world_xyz, b.world_xyz, atol=0.1)
        assert (a.rank, a.diameter_mm, a.probability) == (b.rank, b.diameter_mm, b.probability)
    assert main(["predict", "--dicomweb", pacs, "--study", "1.2.3.4.5", "-o", str(tmp_path / "none"), *options]) == 2
    assert "study 1.2.3.4.5 not found" in capsys.readouterr().err and not (tmp_path / "none").exists()
