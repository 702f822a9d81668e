import numpy as np
import pytest

from noduledet.data.luna16 import PREDICTION_COLUMNS, Findings, Luna16, read_findings, write_findings
from noduledet.errors import UserError


def test_round_trip(tmp_path):
    f = Findings(np.array(["a", "b"]), np.array([[1.5, -2.25, 3.0], [4, 5, 6]]), np.array([5.5, 0.25]))
    write_findings(tmp_path / "x.csv", f, "probability")
    back = read_findings(tmp_path / "x.csv", PREDICTION_COLUMNS)
    assert back.uids.tolist() == ["a", "b"]
    np.testing.assert_allclose(back.xyz, f.xyz)
    np.testing.assert_allclose(back.value, f.value)


def test_wrong_columns_are_named(tmp_path):
    (tmp_path / "a.csv").write_text("seriesuid,x,y,z,diameter_mm\n1,2,3,4,5\n")
    with pytest.raises(UserError, match=r"a\.csv: missing column\(s\) \['coordX', 'coordY', 'coordZ'\]"):
        read_findings(tmp_path / "a.csv")


def test_bad_cell_names_line_and_column(tmp_path):
    (tmp_path / "a.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n1,2,3,4,5\n1,2,abc,4,5\n")
    with pytest.raises(UserError, match=r"a\.csv:3: coordY='abc' is not a number"):
        read_findings(tmp_path / "a.csv")


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(UserError, match="e.csv: empty file"):
        read_findings(tmp_path / "e.csv")
    with pytest.raises(UserError, match="nope.csv: no such file"):
        read_findings(tmp_path / "nope.csv")


def test_layout_errors(tmp_path, phantom_root):
    with pytest.raises(UserError, match="no scans \\(expected subset0..9/<seriesuid>.mhd"):
        Luna16(tmp_path)
    data = Luna16(phantom_root)
    with pytest.raises(UserError, match="unknown seriesuid 1.2.3"):
        data.scan_path("1.2.3")
    assert len(data.uids) == 4 and set(data.subset_of.values()) == {0, 1, 2, 3}
    assert len(data.annotations()) >= 4
