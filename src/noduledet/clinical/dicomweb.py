"""A DICOM series in and out of a PACS over DICOMweb (``dicomweb-client``).

- ``find_series``: QIDO-RS, the series of a study;
- ``fetch_series``: WADO-RS, one series' instances into a folder, which appears only when every
  instance has arrived (written beside it, then renamed: ``noduledet.staging``);
- ``store_files``: STOW-RS, DICOM files (an SR, a SEG) into their study.

Every failure is a ``UserError`` with one line that names the server and what failed: server
unreachable, study or series not found, download incomplete, upload refused (with the server's
HTTP status or the DICOM failure reasons of its STOW response).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient

from noduledet.errors import UserError
from noduledet.staging import staged_dir


@dataclass(frozen=True)
class SeriesInfo:
    """One series of a study as QIDO-RS describes it."""

    uid: str
    modality: str
    instances: int
    description: str = ""


@contextmanager
def _server_errors(url: str, action: str, failed: str = "failed") -> Iterator[None]:
    """Turn the HTTP client's exceptions into one-line ``UserError``s naming ``url`` and ``action``;
    an HTTP error status reads "<action> <failed>: HTTP <code> <reason>" (404: "not found")."""
    try:
        yield
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as err:
        raise UserError(f"{url}: DICOMweb server unreachable while {action} ({type(err).__name__})") from None
    except requests.exceptions.HTTPError as err:
        code = err.response.status_code if err.response is not None else "?"
        reason = err.response.reason if err.response is not None else str(err)
        what = "not found" if code == 404 else f"{failed}: HTTP {code} {reason}"
        raise UserError(f"{url}: {action} {what}") from None
    except requests.exceptions.RequestException as err:
        raise UserError(f"{url}: {action} failed ({type(err).__name__}: {str(err).splitlines()[0]})") from None


def connect(url: str, timeout: float = 30.0) -> DICOMwebClient:
    """A client of the DICOMweb service at ``url`` (e.g. ``http://pacs:8042/dicom-web``).

    Requests are not retried: the client's default retries every failed request (a refused
    connection too) five times over 15 s, which turns "server unreachable" into a long wait.
    """
    client = DICOMwebClient(url.rstrip("/"), timeout=timeout)
    client.set_http_retry_params(retry=False)
    return client


def _tag(item: dict, tag: str, default=""):
    values = item.get(tag, {}).get("Value") or [default]
    return values[0]


def find_series(url: str, study: str, modality: str | None = None, timeout: float = 30.0) -> list[SeriesInfo]:
    """The series of ``study`` (of one ``modality`` if given). An unknown study is a ``UserError``."""
    client = connect(url, timeout)
    with _server_errors(url, f"looking up study {study}"):
        found = client.search_for_series(study_instance_uid=study)
    if not found:
        raise UserError(f"{url}: study {study} not found")
    series = [SeriesInfo(str(_tag(s, "0020000E")), str(_tag(s, "00080060")), int(_tag(s, "00201209", 0)),
                         str(_tag(s, "0008103E"))) for s in found]
    return [s for s in series if modality is None or s.modality == modality]


def _choose_series(url: str, study: str, series: str | None, timeout: float) -> SeriesInfo:
    everything = find_series(url, study, timeout=timeout)
    if series is not None:
        match = [s for s in everything if s.uid == series]
        if not match:
            raise UserError(f"{url}: series {series} not found in study {study}")
        return match[0]
    ct = [s for s in everything if s.modality == "CT"]
    if not ct:
        raise UserError(f"{url}: study {study} has no CT series")
    if len(ct) > 1:
        listing = ", ".join(f"{s.uid} ({s.instances} images)" for s in ct)
        raise UserError(f"{url}: study {study} has {len(ct)} CT series: {listing}; choose one with --series UID")
    return ct[0]


def fetch_series(url: str, study: str, dest: str | Path, series: str | None = None, force: bool = False,
                 timeout: float = 60.0) -> Path:
    """Download one series of ``study`` into the folder ``dest``, one ``<SOPInstanceUID>.dcm`` each.

    Args:
        series: the SeriesInstanceUID; by default the study's only CT series.
        force: replace an existing ``dest``.

    Returns:
        ``dest``, which exists only once every instance that QIDO counted has arrived.
    """
    info = _choose_series(url, study, series, timeout)
    client = connect(url, timeout)
    with staged_dir(dest, force) as tmp:
        count = 0
        with _server_errors(url, f"downloading series {info.uid}"):
            for ds in client.iter_series(study, info.uid):
                ds.save_as(tmp / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
                count += 1
        if count == 0 or (info.instances and count < info.instances):
            raise UserError(f"{url}: series {info.uid} incomplete: {count} of {info.instances} instances arrived")
    return Path(dest)


def _read_for_upload(paths: Sequence[str | Path]) -> list[pydicom.Dataset]:
    """Every file read before anything is sent, so that a bad file leaves the server untouched."""
    datasets = []
    for path in paths:
        try:
            datasets.append(pydicom.dcmread(path))
        except (OSError, pydicom.errors.InvalidDicomError) as err:
            raise UserError(f"{path}: cannot upload, not a readable DICOM file ({err})") from None
    studies = {str(ds.get("StudyInstanceUID", "")) for ds in datasets}
    if len(studies) != 1 or "" in studies:
        raise UserError(f"cannot upload {len(datasets)} files of {len(studies)} studies in one request: "
                        "store one study at a time")
    return datasets


def _failures(response: pydicom.Dataset) -> str:
    failed = response.get("FailedSOPSequence") or []
    return "; ".join(f"{item.get('ReferencedSOPInstanceUID', '?')} reason 0x{int(item.get('FailureReason', 0)):04X}"
                     for item in failed)


def store_files(url: str, paths: Sequence[str | Path], timeout: float = 60.0) -> list[str]:
    """Store DICOM files of one study with STOW-RS (one request, to ``/studies/<StudyInstanceUID>``).

    Returns:
        the SOPInstanceUIDs that the server stored.

    Raises:
        UserError: unreadable file, server unreachable, or upload refused (HTTP status, or the
            instances the STOW response lists as failed, with their DICOM failure reasons).
    """
    if not paths:
        return []
    datasets = _read_for_upload(paths)
    study = str(datasets[0].StudyInstanceUID)
    with _server_errors(url, f"upload of {len(datasets)} file(s) to study {study}", failed="refused"):
        response = connect(url, timeout).store_instances(datasets, study_instance_uid=study)
    failed = _failures(response) if response is not None else ""
    if failed:
        raise UserError(f"{url}: upload to study {study} refused for {failed}")
    stored = (response.get("ReferencedSOPSequence") or []) if response is not None else []
    return [str(item.ReferencedSOPInstanceUID) for item in stored]
