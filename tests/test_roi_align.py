"""The matrix-product RoIAlign backward against torchvision's own (forward is torchvision's)."""

import pytest
import torch
import torchvision
from torchvision.ops import MultiScaleRoIAlign

from noduledet.models.roi_align import PyramidRoIAlign, axis_weights, separable_roi_align


def _rois(count: int, images: int, extent: float, seed: int = 0) -> torch.Tensor:
    """Boxes of every kind: inside, across the edge, fully outside, thinner than a map pixel."""
    g = torch.Generator().manual_seed(seed)
    corner = torch.rand(count, 2, generator=g, dtype=torch.float64) * (extent + 40) - 20
    size = torch.rand(count, 2, generator=g, dtype=torch.float64) ** 3 * extent
    image = torch.randint(0, images, (count, 1), generator=g).double()
    return torch.cat([image, corner, corner + size], dim=1)


@pytest.mark.parametrize("scale", [1.0, 0.25, 0.125])
def test_gradient_equals_torchvisions(scale):
    feature = torch.randn(3, 4, 13, 19, dtype=torch.float64, requires_grad=True)
    rois = _rois(150, 2, 19 / scale)  # image 2 has no RoI: its gradient stays zero
    grad = torch.randn(150, 4, 7, 5, dtype=torch.float64)
    expected = torchvision.ops.roi_align(feature, rois, (7, 5), scale, 2, aligned=False)
    (want,) = torch.autograd.grad(expected, feature, grad)
    out = separable_roi_align(feature, rois, (7, 5), scale, 2)
    (got,) = torch.autograd.grad(out, feature, grad)
    assert torch.equal(out, expected)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    assert want.abs().max() > 1 and not got[2].any()


def test_axis_weights_by_hand():
    # a box from x=1 to x=3 on a 4-pixel row, one bin, two samples at 1.5 and 2.5:
    # each splits half and half between its neighbours, and the two average
    w = axis_weights(torch.tensor([1.0]), torch.tensor([3.0]), 1.0, 1, 2, 4)
    assert torch.allclose(w, torch.tensor([[[0.0, 0.25, 0.5, 0.25]]]))
    # a sample past the last pixel (but within one) sits on it; one further out counts for nothing
    w = axis_weights(torch.tensor([3.0]), torch.tensor([7.0]), 1.0, 2, 1, 4)
    assert torch.allclose(w, torch.tensor([[[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]]))


def test_pyramid_pool_matches_torchvisions_pooler():
    names = ["0", "1", "2", "3"]
    feats = {n: torch.randn(2, 3, 64 >> k, 64 >> k, dtype=torch.float64, requires_grad=True) for k, n in enumerate(names)}
    g = torch.Generator().manual_seed(1)
    corner = torch.rand(80, 2, generator=g, dtype=torch.float64) * 200
    side = 2 ** (2 + 7 * torch.rand(80, 1, generator=g, dtype=torch.float64))  # 4-512 px: every level
    boxes = list(torch.cat([corner, corner + side], dim=1).split(40))
    ours = PyramidRoIAlign(names, 7, 2, first=2, last=5)
    theirs = MultiScaleRoIAlign(names, 7, 2)
    theirs.scales, theirs.map_levels = ours.scales, ours.map_levels
    grad = torch.randn(80, 3, 7, 7, dtype=torch.float64)
    want = torch.autograd.grad(theirs(feats, boxes, [(256, 256)] * 2), list(feats.values()), grad)
    got = torch.autograd.grad(ours(feats, boxes, [(256, 256)] * 2), list(feats.values()), grad)
    for w, g in zip(want, got):
        assert torch.allclose(g, w, rtol=0, atol=1e-12)
    assert sum(bool(w.any()) for w in want) == 4  # the boxes reach every level
    with torch.no_grad():  # inference is torchvision's pooler itself
        assert torch.equal(ours(feats, boxes, [(256, 256)] * 2), theirs(feats, boxes, [(256, 256)] * 2))


def test_refuses_adaptive_sampling():
    with pytest.raises(ValueError, match="sampling_ratio=0"):
        PyramidRoIAlign(["0"], 7, 0, first=4, last=4)
