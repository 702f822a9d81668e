import contextlib
import io

import numpy as np
import pytest

from noduledet.data.luna16 import Findings
from noduledet.boxes import box_iou
from noduledet.metrics.coco import pr_curve, slice_metrics
from noduledet.metrics.froc import FP_RATES, froc, froc_curve, scan_outcome


def _p(boxes, scores):
    return {"boxes": np.array(boxes, dtype=float).reshape(-1, 4), "scores": np.array(scores, dtype=float)}


def _t(boxes):
    return {"boxes": np.array(boxes, dtype=float).reshape(-1, 4)}


def test_box_iou_by_hand():
    assert box_iou([[0, 0, 10, 10]], [[5, 0, 15, 10]])[0, 0] == pytest.approx(50 / 150)


def test_perfect_predictions():
    t = [_t([[10, 10, 20, 20]]), _t([[30, 30, 50, 40]])]
    m = slice_metrics([_p(x["boxes"], [1.0] * len(x["boxes"])) for x in t], t)
    assert (m["ap50"], m["ap"], m["recall"], m["precision"], m["f1"], m["jaccard"]) == (1, 1, 1, 1, 1, 1)


def test_empty_predictions():
    m = slice_metrics([_p([], []), _p([], [])], [_t([[0, 0, 5, 5]]), _t([])])
    assert m["ap50"] == 0 and m["recall"] == 0 and m["f1"] == 0 and np.isnan(m["precision"])
    assert (m["tp"], m["fp"], m["fn"]) == (0, 0, 1)


def test_empty_ground_truth():
    m = slice_metrics([_p([[0, 0, 5, 5]], [0.9])], [_t([])])
    assert np.isnan(m["ap50"]) and np.isnan(m["recall"]) and m["precision"] == 0 and m["fp"] == 1


def test_duplicates_are_false_positives():
    m = slice_metrics([_p([[0, 0, 10, 10], [0, 0, 10, 10]], [0.9, 0.8])], [_t([[0, 0, 10, 10]])])
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 0)
    assert m["precision"] == 0.5 and m["recall"] == 1 and m["f1"] == pytest.approx(2 / 3)
    assert m["ap50"] == pytest.approx(1.0)  # the duplicate ranks after the hit


def test_ap_by_hand():
    # ranked: FP (0.95), TP (0.9), TP (0.6): precision envelope 2/3 at every recall -> AP 2/3
    preds = [_p([[0, 0, 10, 10]], [0.9]), _p([[50, 50, 60, 60], [0, 0, 10, 10]], [0.95, 0.6])]
    m = slice_metrics(preds, [_t([[0, 0, 10, 10]]), _t([[0, 0, 10, 10]])])
    assert m["ap50"] == pytest.approx(2 / 3, abs=1e-9)
    # at threshold 0.7: the FP and one TP count
    assert (m["tp"], m["fp"], m["fn"]) == (2, 1, 0)
    m = slice_metrics(preds, [_t([[0, 0, 10, 10]]), _t([[0, 0, 10, 10]])], score_threshold=0.7)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 1)


def test_jaccard_is_mean_iou_of_matches():
    m = slice_metrics([_p([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.9])],
                      [_t([[0, 0, 10, 8], [20, 20, 30, 30]])])
    assert m["jaccard"] == pytest.approx((0.8 + 1.0) / 2)


def test_mask_jaccard():
    pm = np.zeros((1, 8, 8), bool)
    pm[0, :4, :4] = True
    tm = np.zeros((1, 8, 8), bool)
    tm[0, :4, :2] = True
    p = {**_p([[0, 0, 4, 4]], [0.9]), "masks": pm}
    m = slice_metrics([p], [{**_t([[0, 0, 4, 4]]), "masks": tm}])
    assert m["jaccard_mask"] == pytest.approx(0.5)


def test_ap_agrees_with_stock_cocoeval():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(0)
    preds, targets, anns, dets, images = [], [], [], [], []
    for i in range(30):
        gt = rng.uniform(0, 80, (rng.integers(0, 3), 2))
        gt = np.concatenate([gt, gt + rng.uniform(5, 20, gt.shape)], 1)
        pr = np.concatenate([gt + rng.normal(0, 2, gt.shape), rng.uniform(0, 90, (2, 4)).cumsum(1)[:, [0, 1, 2, 3]] % 90 + [0, 0, 5, 5]])
        pr[:, 2:] = np.maximum(pr[:, 2:], pr[:, :2] + 1)
        sc = rng.uniform(0, 1, len(pr))
        preds.append(_p(pr, sc))
        targets.append(_t(gt))
        images.append({"id": i})
        for b in gt:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1, "iscrowd": 0,
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": (b[2] - b[0]) * (b[3] - b[1])})
        for b, s in zip(pr, sc):
            dets.append({"image_id": i, "category_id": 1, "score": s, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1}]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    m = slice_metrics(preds, targets)
    assert m["ap"] == pytest.approx(ev.stats[0], abs=1e-9)
    assert m["ap50"] == pytest.approx(ev.stats[1], abs=1e-9)


def test_pr_curve_by_hand():
    preds = [_p([[0, 0, 10, 10]], [0.9]), _p([[50, 50, 60, 60], [0, 0, 10, 10]], [0.95, 0.6])]
    precision, recall = pr_curve(preds, [_t([[0, 0, 10, 10]]), _t([[0, 0, 10, 10]])])
    np.testing.assert_allclose(precision, [0, 0.5, 2 / 3])
    np.testing.assert_allclose(recall, [0, 0.5, 1])


def _f(rows):
    rows = list(rows)
    return Findings(np.array([r[0] for r in rows], dtype=str), np.array([r[1:4] for r in rows], dtype=float).reshape(-1, 3),
                    np.array([r[4] for r in rows], dtype=float))


ANN = _f([("A", 0, 0, 0, 10), ("A", 50, 0, 0, 6), ("B", 0, 0, 0, 8)])
EXC = _f([("A", 0, 50, 0, -1)])
CAND = _f([("A", 1, 1, 1, 0.9), ("A", 0, 0, 2, 0.8), ("A", 0, 52, 0, 0.95), ("A", 100, 100, 100, 0.7),
           ("A", 51, 0, 0, 0.3), ("B", 20, 20, 20, 0.6), ("B", 10, 0, 0, 0.99)])


def test_froc_by_hand():
    """Nodule probabilities 0.9, 0.3, missed; FPs 0.99, 0.7, 0.6 over 2 scans.

    Curve: (0,0) (.5,0) (.5,1/3) (1,1/3) (1.5,1/3) (1.5,2/3): sensitivities at 1/8..8 FP/scan
    are 0, 0, 1/3, 1/3, 2/3, 2/3, 2/3 and CPM = (2/3 + 2) / 7 = 8/21."""
    r = froc(ANN, EXC, CAND, ["A", "B"], bootstrap=0)
    np.testing.assert_allclose(r.sensitivities, [0, 0, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3])
    assert r.cpm == pytest.approx(8 / 21)
    assert (r.nodules, r.detected, r.false_positives, r.scans) == (3, 2, 3, 2)


def test_excluded_hit_is_ignored_and_duplicate_counts_once():
    o = scan_outcome(ANN.for_scan("A"), EXC.for_scan("A"), CAND.for_scan("A"))
    np.testing.assert_allclose(o.nodule_probs, [0.9, 0.3])  # 0.8 (a second hit on nodule 1) dropped
    np.testing.assert_allclose(o.fp_probs, [0.7])  # 0.95 on the excluded finding ignored


def test_hundred_candidate_cap():
    fps = [("A", 200 + i, 0, 0, 0.5 + i / 1000) for i in range(150)]
    cand = _f(fps + [("A", 0, 0, 0, 0.1)])  # the only hit ranks 151st: cut by the cap
    o = scan_outcome(ANN.for_scan("A"), EXC.for_scan("A"), cand)
    assert len(o.fp_probs) == 100 and np.isneginf(o.nodule_probs).all()
    assert np.isfinite(scan_outcome(ANN.for_scan("A"), EXC.for_scan("A"), cand, max_per_scan=0).nodule_probs[0])


def test_scans_without_candidates_still_count():
    r = froc(ANN, EXC, CAND.for_scan("A"), ["A", "B"], bootstrap=0)
    assert r.nodules == 3 and r.scans == 2  # B's nodule is missed, B's scan divides the FPs


def test_bootstrap_interval_brackets_the_estimate():
    rng = np.random.default_rng(1)
    rows_a, rows_c = [], []
    for s in range(20):
        for k in range(2):
            rows_a.append((f"s{s}", 100 * k, 0, 0, 10))
            if rng.random() < 0.8:
                rows_c.append((f"s{s}", 100 * k + 1, 0, 0, rng.uniform(0.3, 1)))
        rows_c += [(f"s{s}", 500 + j * 20, 0, 0, rng.uniform(0, 0.8)) for j in range(5)]
    r = froc(_f(rows_a), _f([]), _f(rows_c), [f"s{s}" for s in range(20)], bootstrap=200)
    assert (r.ci_low <= r.sensitivities + 1e-9).all() and (r.sensitivities <= r.ci_high + 1e-9).all()
    assert r.cpm_ci[0] <= r.cpm <= r.cpm_ci[1]


def test_curve_is_monotone():
    fps, sens = froc_curve([scan_outcome(ANN.for_scan(u), EXC.for_scan(u), CAND.for_scan(u)) for u in "AB"])
    assert (np.diff(fps) >= 0).all() and (np.diff(sens) >= 0).all() and len(FP_RATES) == 7


# --- the paper's own definitions: AP (eq 25) and set Jaccard (eq 26) -----------------------

def test_paper_ap_by_hand_is_not_interpolated():
    from noduledet.metrics.coco import paper_ap

    # the case of test_ap_by_hand, 2 reference boxes, ranked FP (0.95), TP (0.9), TP (0.6):
    # rank 1: R 0,   P 0   -> dR 0
    # rank 2: R 1/2, P 1/2 -> 1/2 * 1/2 = 1/4
    # rank 3: R 1,   P 2/3 -> 1/2 * 2/3 = 1/3        AP = 1/4 + 1/3 = 7/12 (COCO's envelope: 2/3)
    preds = [_p([[0, 0, 10, 10]], [0.9]), _p([[50, 50, 60, 60], [0, 0, 10, 10]], [0.95, 0.6])]
    targets = [_t([[0, 0, 10, 10]]), _t([[0, 0, 10, 10]])]
    assert paper_ap(preds, targets) == pytest.approx(7 / 12)
    m = slice_metrics(preds, targets)
    assert m["ap_paper"] == pytest.approx(7 / 12) and m["ap_paper_iou"] == 0.5 and m["ap50"] > m["ap_paper"]


def test_paper_ap_with_a_missed_box_and_an_iou_threshold():
    from noduledet.metrics.coco import paper_ap

    # 3 reference boxes; TP (0.9), FP (0.8), TP (0.7); the third box never found:
    # 1/3 * 1 + 0 + 1/3 * 2/3 = 5/9
    preds = [_p([[0, 0, 10, 10], [40, 40, 50, 50]], [0.9, 0.8]), _p([[0, 0, 10, 8]], [0.7])]
    targets = [_t([[0, 0, 10, 10], [80, 80, 90, 90]]), _t([[0, 0, 10, 10]])]
    assert paper_ap(preds, targets) == pytest.approx(5 / 9)
    # at IoU 0.9 the 0.7 box (IoU 0.8) is a false positive: 1/3 * 1 = 1/3
    assert paper_ap(preds, targets, iou_threshold=0.9) == pytest.approx(1 / 3)
    assert slice_metrics(preds, targets, iou_threshold=0.9)["ap_paper"] == pytest.approx(1 / 3)


def test_paper_ap_ties_are_one_rank_and_edge_cases():
    from noduledet.metrics.coco import average_precision

    # a TP and an FP of equal score: one rank with P 1/2, R 1 -> AP 1/2 in either order
    assert average_precision([0.9, 0.9], [True, False], 1) == 0.5
    assert average_precision([0.9, 0.9], [False, True], 1) == 0.5
    assert average_precision([], [], 2) == 0.0 and np.isnan(average_precision([0.5], [False], 0))


def test_region_overlap_exact_and_against_rasterisation():
    from noduledet.metrics.coco import region_overlap

    # two overlapping predictions: union 100 + 100 - 25 = 175, the reference inside the first
    assert region_overlap([[0, 0, 10, 10], [5, 5, 15, 15]], [[0, 0, 10, 10]]) == (100.0, 175.0)
    # fractional: [0.5, 2.5] x [0, 1] against the unit square: 0.5 in both, 2 + 1 - 0.5 in either
    assert region_overlap([[0.5, 0, 2.5, 1]], [[0, 0, 1, 1]]) == (0.5, 2.5)
    assert region_overlap(np.zeros((0, 4)), np.zeros((0, 4))) == (0.0, 0.0)
    rng = np.random.default_rng(1)
    for _ in range(20):
        a, b = (np.sort(rng.integers(0, 30, size=(n, 2, 2)), axis=1).transpose(0, 2, 1).reshape(n, 4)[:, [0, 2, 1, 3]]
                for n in (3, 2))
        grid_a, grid_b = np.zeros((30, 30), bool), np.zeros((30, 30), bool)
        for grid, boxes in ((grid_a, a), (grid_b, b)):
            for x1, y1, x2, y2 in boxes:
                grid[y1:y2, x1:x2] = True
        assert region_overlap(a, b) == ((grid_a & grid_b).sum(), (grid_a | grid_b).sum())


def test_set_jaccard_by_hand_over_slices():
    from noduledet.metrics.coco import set_jaccard

    # slice 1: prediction [0,10]x[0,10] vs reference [5,15]x[0,10]: A and B 50, A or B 150
    # slice 2: a false positive of 4x4 = 16 (and one of score 0.2, below the operating point)
    # slice 3: a missed reference of 2x5 = 10          Jaccard = 50 / (150 + 16 + 10) = 50/176
    preds = [_p([[0, 0, 10, 10]], [0.9]), _p([[0, 0, 4, 4], [20, 20, 40, 40]], [0.6, 0.2]), _p([], [])]
    targets = [_t([[5, 0, 15, 10]]), _t([]), _t([[0, 0, 2, 5]])]
    assert set_jaccard(preds, targets) == pytest.approx(50 / 176)
    assert slice_metrics(preds, targets)["jaccard_set"] == pytest.approx(50 / 176)
    # at threshold 0.1 the 20x20 box joins A: 50 / (176 + 400)
    assert set_jaccard(preds, targets, score_threshold=0.1) == pytest.approx(50 / 576)
    assert np.isnan(set_jaccard([_p([], [])], [_t([])]))


def test_set_jaccard_on_masks():
    from noduledet.metrics.coco import set_jaccard

    # two predicted masks of 16 px overlapping in 4 px: A = 28 px; B (8 px) lies inside A: 8 / 28
    pm = np.zeros((2, 1, 8, 8), np.float32)
    pm[0, 0, :4, :4], pm[1, 0, 2:6, 2:6] = 1, 1
    tm = np.zeros((1, 8, 8), np.uint8)
    tm[0, :4, :2] = 1
    p = {**_p([[0, 0, 4, 4], [2, 2, 6, 6]], [0.9, 0.8]), "masks": pm}
    t = {**_t([[0, 0, 2, 4]]), "masks": tm}
    empty = ({**_p([], []), "masks": np.zeros((0, 1, 8, 8))}, {**_t([]), "masks": np.zeros((0, 8, 8))})
    assert set_jaccard([p, empty[0]], [t, empty[1]], masks=True) == pytest.approx(8 / 28)
    m = slice_metrics([p, empty[0]], [t, empty[1]])
    assert m["jaccard_set_mask"] == pytest.approx(8 / 28)
    assert np.isnan(slice_metrics([_p([], [])], [_t([[0, 0, 2, 2]])])["jaccard_set_mask"])


def test_slice_metrics_keeps_its_keys_and_adds_the_paper_ones():
    m = slice_metrics([_p([[0, 0, 10, 10]], [0.9])], [_t([[0, 0, 10, 10]])])
    old = {"ap50", "ap", "ap10", "recall", "precision", "f1", "jaccard", "jaccard_mask", "tp", "fp", "fn",
           "slices", "score_threshold", "iou_threshold"}
    assert set(m) == old | {"ap_paper", "ap_paper_iou", "jaccard_set", "jaccard_set_mask"}
    assert (m["ap_paper"], m["jaccard_set"]) == (1.0, 1.0)


def test_an_operating_point_lists_at_most_its_findings_per_scan():
    from noduledet.evaluate import at_operating_points

    nodules = Findings(np.array(["a", "b"]), np.array([[0.0, 0, 0], [100.0, 0, 0]]), np.array([10.0, 10.0]))
    # scan a: its nodule at 0.6 behind false positives of 0.9 and 0.8; scan b: its nodule at 0.95, a false positive 0.7
    table = Findings(np.array(["a", "a", "a", "b", "b"]),
                     np.array([[0.0, 0, 0], [50.0, 0, 0], [60.0, 0, 0], [100.0, 0, 0], [150.0, 0, 0]]),
                     np.array([0.6, 0.9, 0.8, 0.95, 0.7]))
    outcomes = [scan_outcome(nodules.for_scan(u), Findings.empty(), table.for_scan(u)) for u in ("a", "b")]
    points = {"fp_rates": [1.0, 2.0], "thresholds": [0.5, 0.5], "max_findings": [1, 0]}
    rows = at_operating_points(points, outcomes, [table.for_scan(u).value for u in ("a", "b")])
    # at most one per scan: a's 0.9 (a false positive), b's 0.95 (its nodule); no limit: all five pass 0.5
    assert [(r["fp_per_scan"], r["sensitivity"], r["max_findings"]) for r in rows] == [(0.5, 0.5, 1), (1.5, 1.0, 0)]
