"""The JSON records between verbs: each written and read in one place, refused in one line when broken."""

import pytest

from noduledet import records
from noduledet.errors import UserError


def test_splits_round_trip_and_refusals(tmp_path):
    records.write_splits(tmp_path, {"train": ["a", "b"], "val": [], "test": ["c"], "extra": ["x"]})
    assert records.read_splits(tmp_path) == {"train": ["a", "b"], "val": [], "test": ["c"]}
    (tmp_path / "splits.json").write_text('{"train": ["a"], "val": [], "test": "c"}')
    with pytest.raises(UserError, match=r"splits\.json: 'test' must be a list of scan ids"):
        records.read_splits(tmp_path)
    (tmp_path / "splits.json").write_text("{not json")
    with pytest.raises(UserError, match=r"splits\.json: not valid JSON"):
        records.read_splits(tmp_path)
    with pytest.raises(UserError, match=r"none[/\\]splits\.json: missing"):
        records.read_splits(tmp_path / "none")


def test_meta_round_trip_and_a_run_without_one(tmp_path):
    assert records.read_meta(tmp_path) == {}
    records.write_meta(tmp_path, {"seed": 3, "git": None})
    assert records.read_meta(tmp_path) == {"seed": 3, "git": None}
    (tmp_path / "meta.json").write_text("[1, 2]")
    with pytest.raises(UserError, match=r"meta\.json: expected a JSON object \(run metadata\), got list"):
        records.read_meta(tmp_path)


def test_run_record_round_trip(tmp_path):
    with pytest.raises(UserError, match="not a predict output \\(no run.json\\)"):
        records.read_run_record(tmp_path)
    records.write_run_record(tmp_path, {"names": ["a"], "shard": [0, 2]})
    assert records.read_run_record(tmp_path) == {"names": ["a"], "shard": [0, 2]}


def test_scan_record_round_trip(tmp_path):
    assert not records.scan_done(tmp_path)
    records.write_scan_record(tmp_path, {"name": "s", "status": "no candidates"}, [{"probability": 0.5}])
    assert records.scan_done(tmp_path)
    assert records.read_scan_record(tmp_path) == ({"name": "s", "status": "no candidates"}, [{"probability": 0.5}])
    (tmp_path / "scan.json").write_text('{"name": "s"}')
    with pytest.raises(UserError, match=r"scan\.json: no list of candidates"):
        records.read_scan_record(tmp_path)
