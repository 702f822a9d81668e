"""The second stage: isotropic patches, the 3D classifier, operating points and sizes."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import ndimage

from noduledet.config import Config, EvalConfig
from noduledet.data.patches import extract_patches, patch_offsets
from noduledet.fpr import augment_cube, zoom_shift
from noduledet.geometry import Geometry
from noduledet.metrics.froc import (ScanOutcome, at_thresholds, calibrated_max_findings, calibrated_thresholds, max_findings,
                                    sensitivity_by_group, size_groups, thresholds_at)
from noduledet.models.classifier3d import ClassifierSpec, NoduleClassifier3D, _HalvingMaxPool
from tests.conftest import flipped_xy


def _spec(**kw) -> ClassifierSpec:
    """A small classifier's spec: 4 channels, 0.8 mm voxels, the config's window, what ``kw`` says."""
    return ClassifierSpec(**{"size": 16, "spacing_mm": 0.8, "width": 4, "window_hu": (-1000.0, 400.0), **kw})


def _world_volume(axis: int):
    """A volume whose every voxel holds ten times its world coordinate ``axis`` (mm), on an
    anisotropic grid."""
    from noduledet.data.ct import CTVolume

    g = Geometry((0.7, 0.8, 2.0), (-20.0, -30.0, 10.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), (20, 60, 60))
    z, y, x = np.indices(g.shape).reshape(3, -1)
    world = g.voxel_to_world(np.stack([z, y, x], 1))
    return CTVolume(np.rint(10 * world[:, axis]).reshape(g.shape).astype(np.int16), g)


@pytest.mark.parametrize("axis", [0, 1, 2], ids=["x", "y", "z"])
def test_patches_are_world_aligned_cubes_whatever_the_grid(axis):
    volume = _world_volume(axis)
    centre = [0.0, -10.0, 30.0]
    patch = extract_patches(volume.hu, volume.geometry, [centre], size=8, spacing_mm=1.5)[0] / 10
    expected = centre[axis] + patch_offsets(8, 1.5)  # a linear function, interpolated exactly
    line = {0: patch[4, 4, :], 1: patch[4, :, 4], 2: patch[:, 4, 4]}[axis]  # patch axes: world z, y, x
    np.testing.assert_allclose(line, expected, atol=0.06)
    flipped = flipped_xy(volume)
    np.testing.assert_allclose(extract_patches(flipped.hu, flipped.geometry, [centre], 8, 1.5)[0] / 10, patch, atol=1e-4)


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, -1, 0, 0, 0, 1),
                                       (0, 1, 0, 1, 0, 0, 0, 0, -1)], ids=["identity", "flipped", "swapped"])
def test_separable_patches_equal_voxel_by_voxel_interpolation(direction):
    """Axis-aligned scans take three matrix products instead of map_coordinates: the same HU,
    at the array's edges and beyond them too."""
    from noduledet.data import patches

    hu = np.random.default_rng(0).normal(-500, 400, (30, 50, 40)).astype(np.float32)
    g = Geometry((0.7, 0.8, 2.5), (10.0, -20.0, 30.0), direction, hu.shape)
    centres = [g.voxel_to_world(v) for v in ([15, 25, 20], [0, 0, 0], [29.4, 49.9, -3.0], [10.2, 3.3, 45.7])]
    assert patches._axis_of(g) is not None
    got = extract_patches(hu, g, centres, 12, 1.25)
    for c, patch in zip(centres, got):
        np.testing.assert_allclose(patch, patches._interpolate(hu, g, np.asarray(c), patch_offsets(12, 1.25)), atol=1e-3)


def test_oblique_scans_are_interpolated_voxel_by_voxel():
    from noduledet.data import patches

    c, s = np.cos(0.3), np.sin(0.3)
    g = Geometry((0.7, 0.7, 1.0), (0.0, 0.0, 0.0), (c, -s, 0, s, c, 0, 0, 0, 1), (20, 30, 30))
    assert patches._axis_of(g) is None
    hu = np.rint(10 * g.voxel_to_world(np.indices(g.shape).reshape(3, -1).T)[:, 0]).reshape(g.shape)  # 10 x world x
    patch = extract_patches(hu, g, [[5.0, 8.0, 10.0]], 6, 1.0)[0] / 10
    np.testing.assert_allclose(patch[3, 3, :], 5.0 + patch_offsets(6, 1.0), atol=0.06)


def test_classifier_scores_a_batch_and_every_parameter_learns():
    torch.manual_seed(0)
    model = NoduleClassifier3D(_spec(size=16))
    x = model.window(torch.full((6, 16, 16, 16), -800.0))
    x[:3, :, 6:10, 6:10, 6:10] = 0.6  # a blob in the first three
    y = torch.tensor([1.0, 1, 1, 0, 0, 0])
    opt = torch.optim.Adam(model.parameters(), lr=0.003)
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for q in model.parameters())
    with torch.no_grad():
        assert model.eval()(x).shape == (6,)


def test_the_context_view_is_the_whole_cube_averaged_beside_its_centre():
    spec = _spec(size=4, window_hu=(-1000.0, 0.0), context=2)
    assert spec.edge == 8 and _spec(size=4).edge == 4
    hu = torch.from_numpy(np.random.default_rng(0).uniform(-1100, 100, (3, 8, 8, 8)).astype(np.float32))
    x = NoduleClassifier3D(spec).window(hu.clone())
    assert x.shape == (3, 2, 4, 4, 4)
    unit = ((hu.numpy() + 1000) / 1000).clip(0, 1)
    np.testing.assert_allclose(x[:, 0].numpy(), unit[:, 2:6, 2:6, 2:6], atol=1e-6)
    np.testing.assert_allclose(x[:, 1].numpy(), unit.reshape(3, 4, 2, 4, 2, 4, 2).mean(axis=(2, 4, 6)), atol=1e-6)
    flipped = NoduleClassifier3D(spec).window(hu.flip(1, 3))  # a flip of the cube flips both views
    assert torch.allclose(flipped, x.flip(2, 4))
    old = {k: v for k, v in spec.to_dict().items() if k != "context"}  # a checkpoint from before the context
    assert ClassifierSpec.from_dict(old).context == 0


def test_the_context_branch_tells_apart_what_only_lies_outside_the_centre():
    """A bright tube running on beyond the central cube, or stopping inside it: the central cubes
    are the same, so only a classifier with context can learn the label."""
    hu = torch.full((8, 16, 16, 16), -800.0)
    hu[:, 6:10, 6:10, 4:12] = 40.0  # the same blob in every central 8 cube (voxels 4-11)
    hu[:4, 6:10, 6:10, :] = 40.0  # in the first four it is a tube across the whole cube
    y = torch.tensor([0.0, 0, 0, 0, 1, 1, 1, 1])
    torch.manual_seed(0)
    plain, wide = NoduleClassifier3D(_spec(size=8)), NoduleClassifier3D(_spec(size=8, context=2))
    centre = hu[:, 4:12, 4:12, 4:12]
    with torch.no_grad():
        assert torch.equal(plain.eval()(plain.window(centre))[:4], plain(plain.window(centre))[4:])
    opt = torch.optim.Adam(wide.parameters(), lr=0.01)
    x = wide.window(hu)
    for _ in range(60):  # long enough for BatchNorm's running statistics to settle
        loss = torch.nn.functional.binary_cross_entropy_with_logits(wide.train()(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for q in wide.context.parameters())
    with torch.no_grad():
        assert ((wide.eval()(x) > 0).float() == y).all()


def test_stage_two_trains_on_the_wider_cubes_with_context():
    from noduledet.fpr import classifier_spec, cube_margin, fit

    cfg = Config(stage2=replace(Config().stage2, size=8, spacing_mm=1.0, width=4, context=2, epochs=1, samples_per_epoch=32,
                                batch_size=16, synthetic=0.5))
    edge = 16 + 2 * cube_margin(cfg.stage2, classifier_spec(cfg))
    assert cube_margin(cfg.stage2, classifier_spec(cfg)) == 4  # 2.5 mm of shift and 15% of the 16 mm cube's half
    cubes = np.random.default_rng(0).normal(-700, 100, (10, edge, edge, edge)).astype(np.int16)
    model = fit(cubes, np.array([1, 0] * 5), cfg, torch.device("cpu"))
    assert model.spec.context == 2 and model.context is not None and not model.training


@pytest.mark.parametrize("shape", [(3, 2, 8, 8, 8), (2, 3, 7, 5, 6), (1, 1, 2, 3, 3)])
def test_the_classifiers_max_pooling_is_torchs_with_and_without_gradients(shape):
    x = torch.randn(shape, dtype=torch.float64)
    x[0, 0, :2, :2, :2] = 1.5  # a tie: one maximum, whichever element it comes from
    expected = torch.nn.functional.max_pool3d(x, 2)
    with torch.no_grad():
        assert torch.equal(_HalvingMaxPool()(x), expected)
    xg = x.clone().requires_grad_()
    assert torch.equal(_HalvingMaxPool()(xg), expected)
    _HalvingMaxPool()(xg).sum().backward()
    assert xg.grad.sum() == expected.numel()  # each output's gradient reaches one input


@pytest.mark.parametrize("zoom", [0.8, 1.0, 1.3])
def test_separable_resampling_is_scipys_trilinear_with_repeated_edges(zoom):
    rng = np.random.default_rng(1)
    cube = rng.normal(0, 300, (12, 11, 10)).astype(np.float32)
    for start in (np.array([1.3, 0.2, 2.7]), np.array([-2.5, 4.1, -0.6]), rng.uniform(-3, 6, 3)):  # some past the edge
        expected = ndimage.affine_transform(cube, np.full(3, zoom), start, (8, 8, 8), order=1, mode="nearest")
        assert np.allclose(zoom_shift(cube, zoom, start, 8), expected, atol=1e-3)


def test_cube_augmentation_keeps_the_contents():
    cube = np.zeros((12, 12, 12), dtype=np.int16)
    cube[5:7, 5:7, 5:7] = 100
    for seed in range(8):
        out = augment_cube(cube, 10, np.random.default_rng(seed), shift=0.0, noise_hu=0.0)
        assert out.shape == (10, 10, 10) and ((out > 50).sum() == 8)
        moved = augment_cube(cube, 10, np.random.default_rng(seed), noise_hu=0.0)  # up to one voxel off
        weight = np.clip(moved - np.median(moved), 0, None)
        centre = (np.indices(moved.shape) * weight).sum((1, 2, 3)) / weight.sum()
        assert np.abs(centre - 4.5).max() <= 1.0 + 1e-6


def test_cube_zoom_keeps_the_centre_and_changes_the_size():
    grid = np.indices((21, 21, 21)) - 10
    cube = np.where((grid ** 2).sum(0) <= 16, 100, -900).astype(np.int16)  # a ball of radius 4
    volumes = []
    for seed in range(12):
        out = augment_cube(cube, 15, np.random.default_rng(seed), shift=0.0, scale=0.5, noise_hu=0.0)
        inside = np.argwhere(out > -400)
        assert np.abs(inside.mean(0) - 7).max() < 0.6  # centred, whatever the zoom
        volumes.append(len(inside))
    ball = ((grid ** 2).sum(0) <= 16).sum()
    assert min(volumes) < 0.8 * ball and max(volumes) > 1.25 * ball  # zoomed both ways ...
    assert ball / 1.5 ** 3 * 0.8 < min(volumes) and max(volumes) < ball * 1.5 ** 3 * 1.2  # ... within 1.5x


def test_operating_thresholds_by_hand():
    # two scans; false positives at 0.9, 0.8 | 0.7, 0.2; nodules at 0.95, 0.6 | missed
    outcomes = [ScanOutcome(np.array([0.95, 0.6]), np.array([0.9, 0.8])),
                ScanOutcome(np.array([-np.inf]), np.array([0.7, 0.2]))]
    t = thresholds_at(outcomes, (0.5, 1.0, 2.0, 4.0))
    # 1/2 FP/scan over 2 scans allows 1 FP: just above the second highest (0.8); 1 allows 2:
    # just above the third (0.7); 2 and 4 allow 4 and 8 of the 4 there are: everything passes
    assert t[0] == pytest.approx(0.8) and t[0] > 0.8 and t[1] == pytest.approx(0.7) and t[1] > 0.7
    assert t[2:] == [0.0, 0.0]
    rows = at_thresholds(outcomes, t)
    assert [r["fp_per_scan"] for r in rows] == [0.5, 1.0, 2.0, 2.0]
    assert [r["sensitivity"] for r in rows] == pytest.approx([1 / 3, 1 / 3, 2 / 3, 2 / 3])


def test_calibrated_thresholds_by_hand():
    # the scans of the test above: false positives 0.9, 0.8 | 0.7, 0.2; nodules 0.95, 0.6 | missed
    outcomes = [ScanOutcome(np.array([0.95, 0.6]), np.array([0.9, 0.8])),
                ScanOutcome(np.array([-np.inf]), np.array([0.7, 0.2]))]
    # 1/2 FP/scan allows 1 of the 4: the highest's probability, 0.9; 1 allows 2: 0.8; 2 allows
    # all 4: the lowest's, 0.2; 4 allows 8 of 4: every candidate
    t = calibrated_thresholds(outcomes, (0.5, 1.0, 2.0, 4.0))
    assert t == [0.9, 0.8, 0.2, 0.0]
    rows = at_thresholds(outcomes, t)  # here as many pass as with thresholds_at's
    assert [r["fp_per_scan"] for r in rows] == [0.5, 1.0, 2.0, 2.0]
    assert [r["sensitivity"] for r in rows] == pytest.approx([1 / 3, 1 / 3, 2 / 3, 2 / 3])
    # 1/2 FP/scan on one scan allows none: just above the highest
    one = calibrated_thresholds(outcomes[:1], (0.5,))[0]
    assert one > 0.9 and one == pytest.approx(0.9)
    assert calibrated_thresholds([ScanOutcome(np.array([0.5]), np.zeros(0))], (1.0,)) == [0.0]
    # probabilities that tie (a saturated sigmoid): never more than k pass
    tied = calibrated_thresholds([ScanOutcome(np.zeros(0), np.array([1.0, 1.0, 0.3]))], (1.0, 2.0, 3.0))
    assert tied[0] > 1.0 and tied[1:] == [1.0, 0.3]


def test_the_findings_per_scan_at_most_are_the_busiest_validation_scans():
    listed = [np.array([0.95, 0.9, 0.8, 0.6]), np.array([0.7, 0.2]), np.zeros(0)]  # three scans' candidates
    # at 0.85: 2, 0 and 0 pass; at 0.65: 3, 1, 0; at 0.2: 4, 2, 0; at 0.99 none anywhere: still 1
    assert calibrated_max_findings(listed, [0.85, 0.65, 0.2, 0.99]) == [2, 3, 4, 1]
    assert calibrated_max_findings([], [0.5]) == [1]
    assert max_findings({"fp_rates": [0.5, 1.0], "thresholds": [0.9, 0.5]}) == [0, 0]  # before the limit: none
    assert max_findings({"fp_rates": [0.5, 1.0], "thresholds": [0.9, 0.5], "max_findings": [2, 3]}) == [2, 3]


def test_calibrated_thresholds_expect_the_rate_on_new_scans():
    # four validation scans of 50 false positives each, probabilities uniform on (0, 1): a new
    # scan's 50 pass a threshold t 50 (1 - t) times on average. Over 2000 validation draws the
    # calibrated 1-FP threshold (the 4th highest of 200) expects 50 x 4 / 201 = 0.995 per new
    # scan; thresholds_at's (just above the 5th) 50 x 5 / 201 = 1.244, a quarter too many
    rng = np.random.default_rng(0)
    new, lowest = [], []
    for _ in range(2000):
        val = [ScanOutcome(np.zeros(0), rng.random(50)) for _ in range(4)]
        new.append(50 * (1 - calibrated_thresholds(val, (1.0,))[0]))
        lowest.append(50 * (1 - thresholds_at(val, (1.0,))[0]))
    assert np.mean(new) == pytest.approx(50 * 4 / 201, abs=0.04)
    assert np.mean(lowest) == pytest.approx(50 * 5 / 201, abs=0.04)


def test_sensitivity_by_size_by_hand():
    outcomes = [ScanOutcome(np.array([0.95, 0.6, -np.inf]), np.array([0.9, 0.1]))]
    rows = sensitivity_by_group(outcomes, size_groups(np.array([4.0, 8.0, 20.0])), rates=(1.0, 4.0),
                                pooled=np.array([True, True, True]))
    # 1 FP/scan: threshold just above 0.1 -> 0.95 and 0.6 pass; 4 FP/scan: everything
    assert [r["group"] for r in rows] == ["3-6 mm", "6-10 mm", ">= 10 mm"]
    assert [r["sensitivity"] for r in rows] == [[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]
    assert [r["nodules"] for r in rows] == [1, 1, 1]
    assert [r["in_pool"] for r in rows] == [1, 1, 1]  # the third was in the pool, then cut


def test_pipeline_rescores_with_the_second_stage():
    from noduledet.inference import Detector
    from noduledet.pipeline import Pipeline
    from tests.test_pipeline import BrightBlobs, _chest_with_nodule

    volume, world = _chest_with_nodule(flipped=True)

    class Constant(NoduleClassifier3D):
        def forward(self, x):
            return torch.full((len(x),), -1.0)  # sigmoid 0.269

    constant = Constant(_spec(size=8))
    cfg = Config()
    detector = Detector(BrightBlobs(), (-5.0, 0.0, 5.0), (-1000.0, 400.0), channels_last=False)
    one = Pipeline(detector, EvalConfig(), cfg).run_volume(volume)
    both = Pipeline(detector, EvalConfig(), cfg, classifier=constant).run_volume(volume)
    assert len(both.candidates) == len(one.candidates) == 1
    assert both.stage1[0].probability == pytest.approx(0.9) and one.stage1 == one.candidates
    c = both.candidates[0]
    assert c.probability == pytest.approx(1 / (1 + np.e)) and c.stage1 == pytest.approx(0.9)  # the default: stage two's
    assert np.linalg.norm(c.world_xyz - world) < 0.8 and "stage2_s" in both.timings
    assert c.to_dict()["stage1_probability"] == pytest.approx(0.9)
    for combine, expected in (("mean", (0.9 + 1 / (1 + np.e)) / 2), ("product", 0.9 / (1 + np.e))):
        chosen = Config(stage2=replace(cfg.stage2, combine=combine))
        found = Pipeline(detector, EvalConfig(), chosen, classifier=constant).run_volume(volume)
        assert found.candidates[0].probability == pytest.approx(expected), combine
    # stage one blind (nothing reaches min_score): the blob filter still puts the nodule before stage two
    blind = EvalConfig(min_score=0.95)
    assert not Pipeline(detector, blind, cfg).run_volume(volume).candidates
    found = Pipeline(detector, blind, cfg, classifier=constant).run_volume(volume)
    assert len(found.candidates) == 1 and not found.stage1 and "blobs_s" in found.timings
    c = found.candidates[0]
    assert np.linalg.norm(c.world_xyz - world) < 1.0 and c.stage1 == 0.0
    assert c.probability == pytest.approx(1 / (1 + np.e))  # the classifier's alone: stage one never proposed it
    off = Config(stage2=replace(cfg.stage2, blobs=0))
    assert not Pipeline(detector, blind, off, classifier=constant).run_volume(volume).candidates


def test_the_pipeline_cuts_the_wider_cube_for_a_classifier_with_context():
    from noduledet.inference import Detector
    from noduledet.candidates import Candidate
    from noduledet.pipeline import Pipeline
    from tests.test_pipeline import BrightBlobs

    class OutshoneByContext(NoduleClassifier3D):
        def forward(self, x):  # how much brighter the coarse view is than the centre
            return 100 * (x[:, 1].mean(dim=(1, 2, 3)) - x[:, 0].mean(dim=(1, 2, 3)))

    g = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), (30, 30, 80))
    hu = np.full(g.shape, -900.0, dtype=np.float32)
    hu[:, :, 60:68] = 50.0  # a wall 6-13 mm from the spot at x 54: outside its 8 mm cube, inside the 16 mm one
    spots = [Candidate(np.array([15.0, 15.0, x]), g.voxel_to_world([15, 15, x]), 0.0, 5.0, 1, (15, 15), [])
             for x in (20.0, 54.0)]
    detector = Detector(BrightBlobs(), (-5.0, 0.0, 5.0), (-1000.0, 400.0), channels_last=False)
    cfg = Config(stage2=replace(Config().stage2, flips_top=0))
    found = Pipeline(detector, EvalConfig(), cfg, classifier=OutshoneByContext(_spec(size=8, context=2))
                     ).rescore(hu, g, spots)
    p = {float(c.world_xyz[0]): c.probability for c in found}
    assert p[20.0] == pytest.approx(0.5, abs=1e-6) and p[54.0] > 0.99


def test_the_most_probable_cubes_are_scored_under_the_eight_flips():
    from noduledet.inference import Detector
    from noduledet.candidates import Candidate
    from noduledet.pipeline import Pipeline
    from tests.test_pipeline import BrightBlobs

    class LowXBrighter(NoduleClassifier3D):
        def forward(self, x):  # by how much the cube's low-x half outshines its high-x half: a flip of x negates it
            half = x.shape[-1] // 2
            return 30 * (x[..., :half].mean(dim=(1, 2, 3, 4)) - x[..., half:].mean(dim=(1, 2, 3, 4)))

    g = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), (30, 30, 80))
    hu = np.random.default_rng(0).normal(-500, 300, g.shape).astype(np.float32)
    spots = [Candidate(np.array([15.0, 15.0, x]), g.voxel_to_world([15, 15, x]), 0.0, 5.0, 1, (15, 15), [])
             for x in (10.0, 25.0, 40.0, 55.0, 70.0)]
    detector = Detector(BrightBlobs(), (-5.0, 0.0, 5.0), (-1000.0, 400.0), channels_last=False)
    classifier = LowXBrighter(_spec(size=8))

    def scores(top: int) -> dict[float, float]:
        cfg = Config(stage2=replace(Config().stage2, flips_top=top))
        found = Pipeline(detector, EvalConfig(), cfg, classifier=classifier).rescore(hu, g, spots)
        return {float(c.world_xyz[0]): c.probability for c in found}

    once, flipped = scores(0), scores(2)
    assert len(set(once.values())) == 5
    top = sorted(once, key=lambda x: -once[x])[:2]
    for x in once:  # half the flips turn x over: sigmoid(L) and sigmoid(-L) average to exactly 1/2
        assert flipped[x] == pytest.approx(0.5 if x in top else once[x], abs=1e-6)
