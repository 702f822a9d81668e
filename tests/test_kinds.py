"""Each nodule's location and texture beside annotations.csv (noduledet.data.kinds), and the FROC by kind."""

import numpy as np
import pytest

from noduledet.data.kinds import kinds_of, read_kinds, write_kinds
from noduledet.data.luna16 import Findings
from noduledet.errors import UserError
from noduledet.metrics.froc import froc

HEADER = "seriesuid,coordX,coordY,coordZ,diameter_mm,location,texture\n"


def _annotations() -> Findings:
    return Findings(np.array(["a", "a", "b"]), np.array([[0.0, 0, 0], [30.0, 0, 0], [0.0, 0, 0]]), np.array([4.0, 10.0, 6.0]))


def test_kinds_round_trip_and_match_their_annotations_by_place(tmp_path):
    ann = _annotations()
    rows = Findings(ann.uids[::-1], ann.xyz[::-1], ann.value[::-1],
                    extra={"location": np.array(["vascular", "free", "pleural"]),
                           "texture": np.array(["solid", "ground-glass", "part-solid"])})
    write_kinds(tmp_path / "annotations_kinds.csv", rows)
    kinds = kinds_of(ann, read_kinds(tmp_path / "annotations_kinds.csv"))
    assert kinds["location"].tolist() == ["pleural", "free", "vascular"]  # found by scan and place, not by order
    assert kinds["texture"].tolist() == ["part-solid", "ground-glass", "solid"]


@pytest.mark.parametrize("body, message", [
    ("a,0,0,0,4,pleura,solid\n", "annotations_kinds.csv:3: location='pleura'; choose from ['free', 'pleural', 'vascular']"),
    ("a,0,0,0,4,free,glass\n", "annotations_kinds.csv:3: texture='glass'"),
], ids=["location", "texture"])
def test_an_unknown_kind_is_refused_with_its_line(tmp_path, body, message):
    (tmp_path / "annotations_kinds.csv").write_text(HEADER + "a,30,0,0,10,free,solid\n" + body)
    with pytest.raises(UserError) as err:
        read_kinds(tmp_path / "annotations_kinds.csv")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_missing_column_or_row_is_refused(tmp_path):
    (tmp_path / "annotations_kinds.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm,location\na,0,0,0,4,free\n")
    with pytest.raises(UserError, match="missing column 'texture'"):
        read_kinds(tmp_path / "annotations_kinds.csv")
    (tmp_path / "annotations_kinds.csv").write_text(HEADER + "a,0,0,0,4,free,solid\na,30,0,0,10,free,solid\n")
    with pytest.raises(UserError, match=r"no row for the nodule of b at \(0.00, 0.00, 0.00\)"):
        kinds_of(_annotations(), read_kinds(tmp_path / "annotations_kinds.csv"))


def test_froc_by_kind_and_the_pool_by_hand():
    ann = _annotations()
    kinds = {"location": np.array(["pleural", "free", "pleural"]), "texture": np.array(["solid", "solid", "ground-glass"])}
    # scan a: its first nodule at 0.9, a false positive at 0.5, its second nodule only in the pool; scan b: missed
    candidates = Findings(np.array(["a", "a"]), np.array([[0.5, 0, 0], [60.0, 0, 0]]), np.array([0.9, 0.5]))
    pool = Findings(np.array(["a", "a", "a"]), np.array([[0.5, 0, 0], [60.0, 0, 0], [31.0, 0, 0]]), np.array([0.9, 0.5, 0.1]))
    r = froc(ann, Findings.empty(), candidates, ["a", "b"], bootstrap=0, pool=pool, kinds=kinds).to_dict()
    by = {row["group"]: row for row in r["by_kind"]}
    assert (by["pleural"]["nodules"], by["pleural"]["in_pool"], by["pleural"]["sensitivity"]) == (2, 1, [0.5, 0.5])
    assert (by["free"]["nodules"], by["free"]["in_pool"], by["free"]["sensitivity"]) == (1, 1, [0.0, 0.0])
    assert by["vascular"]["nodules"] == 0 and by["ground-glass"]["in_pool"] == 0
    assert r["in_pool"] == 2 and r["detected"] == 1
    sizes = {row["group"]: row["in_pool"] for row in r["by_size"]}
    assert sizes == {"3-6 mm": 1, "6-10 mm": 0, ">= 10 mm": 1}
