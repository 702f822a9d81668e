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
        (NaN without masks), tp, fp, fn, slices.
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
    }


def pr_curve(predictions: list[dict], targets: list[dict], iou_threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall as the score threshold falls through every detection."""
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
    order = np.argsort(-np.array(scores), kind="stable")
    hits_sorted = np.array(hits, dtype=float)[order]
    tp = np.cumsum(hits_sorted)
    precision = tp / np.arange(1, len(tp) + 1)
    recall = tp / max(n_gt, 1)
    return precision, recall
