"""Slice-level metrics, the paper's: mAP, Recall, Precision, F1 and Jaccard.

Every slice evaluated is one image; nodule cross-sections are the single class.

- **AP** (average precision) via pycocotools' COCOeval, 101-point interpolated, at IoU 0.5
  (``ap50``: the paper's mAP, one class so mAP = AP), averaged over IoU 0.5:0.95 (``ap``), and at
  IoU 0.1 (``ap10``: lenient localisation for small lesions). Up to 100 detections per slice.
- **Recall, Precision, F1** at an operating point: detections with score >= ``score_threshold``
  are matched greedily (highest score first) to the unmatched ground-truth box of highest IoU,
  if that IoU >= ``iou_threshold``. Recall = TP / (TP + FN), Precision = TP / (TP + FP),
  F1 = 2PR / (P + R).
- **Jaccard** = the mean IoU of the matched true positives (box IoU; mask IoU as
  ``jaccard_mask`` when masks are given).

The paper's own definitions, beside these (``ap_paper``, ``jaccard_set``):

- **AP, eq 25** (``paper_ap``): the detections of all slices ranked by score, each a true
  positive when matched as above at IoU >= ``iou_threshold`` (the paper does not state one;
  0.5 by default, reported as ``ap_paper_iou``); AP = sum_n (R_n - R_{n-1}) * P_n over the
  ranks, not interpolated (COCO's AP takes the best precision at any higher recall, at 101
  recall points, so it is never lower). Detections of equal score form one rank.
- **Jaccard, eq 26** (``set_jaccard``): |A and B| / |A or B| with A the region the detections
  kept at the operating point cover and B the region the reference covers: the union of the
  boxes (exact areas) or of the masks. A and B are taken over all slices together (each
  slice's pixels are distinct elements), so a slice with only a false positive adds to the
  union and a large nodule weighs more than a small one, as the formula says for sets.

The paper reports Jaccard and F1 in percent and mAP, Recall as fractions; here all are in [0, 1].
"""

from __future__ import annotations

import contextlib
import io

import numpy as np

from noduledet.boxes import box_iou

AP_IOUS = np.round(np.arange(0.5, 0.96, 0.05), 2)


def match(pred_boxes: np.ndarray, scores: np.ndarray, gt_boxes: np.ndarray, iou_threshold: float = 0.5):
    """Greedy one-to-one matching of one image's predictions to its ground truth.

    Returns:
        (K, 2) int pairs (prediction index, ground-truth index) and their (K,) IoUs.
    """
    order = np.argsort(-np.asarray(scores), kind="stable")
    ious = box_iou(pred_boxes, gt_boxes)
    taken = np.zeros(len(gt_boxes), dtype=bool)
    pairs, values = [], []
    for i in order:
        if not len(gt_boxes):
            break
        cand = np.where(taken, -1.0, ious[i])
        j = int(np.argmax(cand))
        if cand[j] >= iou_threshold:
            taken[j] = True
            pairs.append((int(i), j))
            values.append(float(cand[j]))
    return np.array(pairs, dtype=int).reshape(-1, 2), np.array(values)


def _coco_ap(predictions: list[dict], targets: list[dict], ious: np.ndarray) -> np.ndarray:
    """AP at each IoU threshold in ``ious`` by pycocotools (NaN when there is no ground truth)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, dets = [], [], []
    for i, (p, t) in enumerate(zip(predictions, targets)):
        images.append({"id": i})
        for b in np.asarray(t["boxes"]).reshape(-1, 4):
            w, h = float(b[2] - b[0]), float(b[3] - b[1])
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1, "bbox": [float(b[0]), float(b[1]), w, h],
                         "area": w * h, "iscrowd": 0})
        for b, s in zip(np.asarray(p["boxes"]).reshape(-1, 4), np.asarray(p["scores"]).reshape(-1)):
            dets.append({"image_id": i, "category_id": 1, "score": float(s),
                         "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]})
    if not anns:
        return np.full(len(ious), np.nan)
    if not dets:
        return np.zeros(len(ious))
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "nodule"}]}
        gt.createIndex()
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.iouThrs = np.asarray(ious, dtype=float)
        ev.params.maxDets = [100]
        ev.params.areaRng, ev.params.areaRngLbl = [[0, 1e10]], ["all"]
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"][:, :, 0, 0, 0]  # (T, 101 recall points)
    return np.array([p[p > -1].mean() if (p > -1).any() else 0.0 for p in precision])


def slice_metrics(predictions: list[dict], targets: list[dict], score_threshold: float = 0.5,
                  iou_threshold: float = 0.5) -> dict:
    """The paper's metrics over a set of slices.

    Args:
        predictions: per slice, ``boxes`` (N, 4), ``scores`` (N,) and optionally ``masks``
            (N, H, W) bool.
        targets: per slice, ``boxes`` (M, 4) and optionally ``masks`` (M, H, W).

    Returns:
        dict with ap50 (mAP), ap (0.5:0.95), ap10, recall, precision, f1, jaccard, jaccard_mask
        (NaN without masks), tp, fp, fn, slices, and the paper's own definitions: ap_paper (eq 25
        at IoU ``ap_paper_iou`` = ``iou_threshold``), jaccard_set (eq 26 on boxes at
        ``score_threshold``) and jaccard_set_mask (on masks; NaN unless every slice has masks).
    """
    ious = np.concatenate([[0.1], AP_IOUS])
    ap = _coco_ap(predictions, targets, ious)
    tp = fp = fn = 0
    box_ious, mask_ious = [], []
    for p, t in zip(predictions, targets):
        keep = np.asarray(p["scores"]).reshape(-1) >= score_threshold
        pb = np.asarray(p["boxes"]).reshape(-1, 4)[keep]
        tb = np.asarray(t["boxes"]).reshape(-1, 4)
        pairs, values = match(pb, np.asarray(p["scores"]).reshape(-1)[keep], tb, iou_threshold)
        tp += len(pairs)
        fp += len(pb) - len(pairs)
        fn += len(tb) - len(pairs)
        box_ious += values.tolist()
        if "masks" in p and "masks" in t and len(pairs):
            pm = np.asarray(p["masks"])[keep]
            tm = np.asarray(t["masks"]).astype(bool)
            for i, j in pairs:
                inter = np.logical_and(pm[i], tm[j]).sum()
                union = np.logical_or(pm[i], tm[j]).sum()
                mask_ious.append(inter / union if union else 0.0)
    recall = tp / (tp + fn) if tp + fn else float("nan")
    precision = tp / (tp + fp) if tp + fp else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
    return {
        "ap50": float(ap[1]), "ap": float(np.mean(ap[1:])), "ap10": float(ap[0]),
        "recall": recall, "precision": precision, "f1": f1,
        "jaccard": float(np.mean(box_ious)) if box_ious else float("nan"),
        "jaccard_mask": float(np.mean(mask_ious)) if mask_ious else float("nan"),
        "tp": tp, "fp": fp, "fn": fn, "slices": len(targets),
        "score_threshold": score_threshold, "iou_threshold": iou_threshold,
        "ap_paper": paper_ap(predictions, targets, iou_threshold), "ap_paper_iou": iou_threshold,
        "jaccard_set": set_jaccard(predictions, targets, score_threshold),
        "jaccard_set_mask": (set_jaccard(predictions, targets, score_threshold, masks=True)
                             if all("masks" in d for d in [*predictions, *targets]) else float("nan")),
    }


def ranked_hits(predictions: list[dict], targets: list[dict], iou_threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray, int]:
    """Every detection's score and whether it is a true positive (``match`` per slice), unsorted.

    Returns:
        scores (N,), hits (N,) bool, and the number of reference boxes.
    """
    scores, hits = [], []
    n_gt = 0
    for p, t in zip(predictions, targets):
        pb, ps = np.asarray(p["boxes"]).reshape(-1, 4), np.asarray(p["scores"]).reshape(-1)
        tb = np.asarray(t["boxes"]).reshape(-1, 4)
        n_gt += len(tb)
        pairs, _ = match(pb, ps, tb, iou_threshold)
        hit = np.zeros(len(pb), dtype=bool)
        hit[pairs[:, 0]] = True
        scores += ps.tolist()
        hits += hit.tolist()
    return np.array(scores, dtype=float), np.array(hits, dtype=bool), n_gt


def average_precision(scores: np.ndarray, hits: np.ndarray, n_gt: int) -> float:
    """The paper's AP (eq 25): sum over ranks of (R_n - R_{n-1}) * P_n, not interpolated.

    Detections are ranked by falling score; detections of equal score are one rank (precision
    and recall read after all of them), so the value does not depend on their order.

    Args:
        scores: (N,) detection scores; hits: (N,) true positive or not; n_gt: reference boxes.

    Returns:
        AP in [0, 1]; NaN when ``n_gt`` is 0.
    """
    if n_gt == 0:
        return float("nan")
    scores, hits = np.asarray(scores, dtype=float).reshape(-1), np.asarray(hits, dtype=bool).reshape(-1)
    if not len(scores):
        return 0.0
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(hits[order])
    last = np.flatnonzero(np.append(np.diff(scores[order]) != 0, True))  # the end of each rank
    precision, recall = tp[last] / (last + 1), tp[last] / n_gt
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def paper_ap(predictions: list[dict], targets: list[dict], iou_threshold: float = 0.5) -> float:
    """The paper's AP (eq 25) over slices: ``average_precision`` of ``ranked_hits``."""
    return average_precision(*ranked_hits(predictions, targets, iou_threshold))


def _covered(boxes: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """(len(ys) - 1, len(xs) - 1) bool: the grid cell between consecutive edges lies in a box."""
    cx, cy = (xs[:-1] + xs[1:]) / 2, (ys[:-1] + ys[1:]) / 2
    b = boxes[:, :, None, None]
    inside = (b[:, 0] <= cx[None, None, :]) & (cx[None, None, :] < b[:, 2]) & \
             (b[:, 1] <= cy[None, :, None]) & (cy[None, :, None] < b[:, 3])  # (K, ny, nx)
    return inside.any(0)


def region_overlap(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Exact areas (px^2) of (union of boxes a) and (union of boxes b), and of their union.

    The box edges cut the plane into a grid of cells, each wholly in or out of every box.

    Args:
        a: (N, 4), b: (M, 4) boxes x1, y1, x2, y2.

    Returns:
        (intersection area, union area).
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    both = np.concatenate([a, b])
    if not len(both):
        return 0.0, 0.0
    xs, ys = np.unique(both[:, [0, 2]]), np.unique(both[:, [1, 3]])
    cells = np.outer(np.diff(ys), np.diff(xs))  # (ny, nx) areas
    in_a, in_b = _covered(a, xs, ys), _covered(b, xs, ys)
    return float(cells[in_a & in_b].sum()), float(cells[in_a | in_b].sum())


def _mask_union(masks) -> np.ndarray:
    """(H, W) bool: the pixels inside any of the masks (N, H, W) or (N, 1, H, W), N may be 0."""
    m = np.asarray(masks).astype(bool)
    return m.reshape(-1, *m.shape[-2:]).any(0)


def set_jaccard(predictions: list[dict], targets: list[dict], score_threshold: float = 0.5,
                masks: bool = False) -> float:
    """The paper's Jaccard (eq 26): |A and B| / |A or B| over all slices at the operating point.

    Args:
        predictions: per slice ``boxes`` (N, 4), ``scores`` (N,) and, with ``masks``, ``masks``
            (N, H, W) or (N, 1, H, W), nonzero = inside (N may be 0; H, W must be there).
        targets: per slice ``boxes`` (M, 4) and, with ``masks``, ``masks`` (M, H, W).
        score_threshold: detections with a lower score are not in A.
        masks: A and B from the masks (pixels) rather than the boxes (exact areas).

    Returns:
        sum of |A and B| over sum of |A or B|; NaN when both regions are empty everywhere.
    """
    inter = union = 0.0
    for p, t in zip(predictions, targets):
        keep = np.asarray(p["scores"]).reshape(-1) >= score_threshold
        if masks:
            pm, tm = _mask_union(np.asarray(p["masks"])[keep]), _mask_union(t["masks"])
            inter += float(np.logical_and(pm, tm).sum())
            union += float(np.logical_or(pm, tm).sum())
        else:
            i, u = region_overlap(np.asarray(p["boxes"]).reshape(-1, 4)[keep], t["boxes"])
            inter, union = inter + i, union + u
    return inter / union if union else float("nan")


def pr_curve(predictions: list[dict], targets: list[dict], iou_threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall as the score threshold falls through every detection."""
    scores, hits, n_gt = ranked_hits(predictions, targets, iou_threshold)
    order = np.argsort(-scores, kind="stable")
    hits_sorted = hits.astype(float)[order]
    tp = np.cumsum(hits_sorted)
    precision = tp / np.arange(1, len(tp) + 1)
    recall = tp / max(n_gt, 1)
    return precision, recall
