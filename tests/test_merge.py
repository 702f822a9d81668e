import numpy as np

from noduledet.boxes import sphere_box
from noduledet.geometry import Geometry
from noduledet.candidates import SliceDetections
from noduledet.merge import merge_slices, z_steps

G = Geometry((0.7, 0.7, 1.25), (-100.0, 50.0, -300.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1), (60, 200, 200))


def _sphere(center_zyx, diameter, score=0.9):
    dets = []
    for z in range(60):
        b = sphere_box(center_zyx, diameter / 2, z, G.spacing)
        if b is not None:
            dets.append(SliceDetections(z, np.array([b]), np.array([score])))
    return dets


def test_a_sphere_becomes_one_candidate_at_its_centre():
    centre = np.array([30.0, 80.3, 120.6])
    cands = merge_slices(_sphere(centre, 10.0), G)
    assert len(cands) == 1
    c = cands[0]
    np.testing.assert_allclose(c.voxel_zyx, centre, atol=0.5)
    np.testing.assert_allclose(c.world_xyz, G.voxel_to_world(centre), atol=0.7)
    assert c.probability == 0.9 and abs(c.diameter_mm - 10.0) < 0.5


def test_two_nodules_stay_apart_and_sort_by_probability():
    dets = _sphere([20.0, 50, 50], 8, 0.6)
    for d in _sphere([22.0, 150, 150], 12, 0.95):
        match = next((x for x in dets if x.z == d.z), None)
        if match:
            match.boxes = np.vstack([match.boxes, d.boxes])
            match.scores = np.concatenate([match.scores, d.scores])
        else:
            dets.append(d)
    cands = merge_slices(sorted(dets, key=lambda d: d.z), G)
    assert [round(c.probability, 2) for c in cands] == [0.95, 0.6]
    np.testing.assert_allclose(cands[0].voxel_zyx[1:], [150, 150], atol=0.5)


def test_a_vessel_in_the_chain_does_not_move_the_centre():
    dets = _sphere([20.0, 100, 100], 8, 0.9)
    # a thin vessel continuing upwards from the nodule, weaker
    for z in range(int(max(d.z for d in dets)) + 1, 45):
        dets.append(SliceDetections(z, np.array([[98.0, 98, 103, 103]]), np.array([0.5])))
    c = merge_slices(dets, G)[0]
    assert abs(c.voxel_zyx[0] - 20.0) < 1.0


def test_a_vessel_scoring_a_little_higher_does_not_take_the_centre():
    # seen on a 15 mm juxtavascular phantom nodule: the vessel's small boxes at 0.995, the
    # nodule's at 0.98, and the candidate's centre 9 mm off the nodule (a miss by LUNA16's rule)
    dets = _sphere([20.0, 100, 100], 15, 0.98)
    for z in range(int(max(d.z for d in dets)) + 1, 50):
        dets.append(SliceDetections(z, np.array([[97.0, 97, 104, 104]]), np.array([0.995])))
    c = merge_slices(dets, G)[0]
    assert abs(c.voxel_zyx[0] - 20.0) < 1.0 and abs(c.diameter_mm - 15) < 1
    assert c.probability == 0.995  # the group's best score stays its probability


def test_low_scores_are_dropped():
    assert merge_slices(_sphere([30.0, 80, 80], 10, 0.01), G, min_score=0.05) == []


def test_one_rule_turns_the_step_and_the_link_into_slices():
    # (step_mm, link_mm, slice spacing) -> (step, gap): the step rounds, the gap floors but reaches the next step
    assert z_steps(3.0, 3.0, 0.625) == (5, 5)  # 4.8 slices: the step 5, the link floored to 4 then raised
    assert z_steps(3.0, 3.0, 0.8) == (4, 4)
    assert z_steps(3.0, 3.0, 1.7) == (2, 2)
    assert z_steps(3.0, 3.0, 2.0) == (2, 2)
    assert z_steps(2.0, 3.0, 0.7) == (3, 4)  # the defaults, as before: every third slice, links 4 slices
    assert z_steps(2.0, 3.0, 1.25) == (2, 2)
    assert z_steps(0.0, 3.0, 1.0) == (1, 3)  # every slice


def test_detections_a_step_apart_join_when_the_link_alone_falls_short():
    g = Geometry((0.7, 0.7, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), (20, 100, 100))
    dets = [SliceDetections(z, np.array([[40.0, 40, 60, 60]]), np.array([0.9])) for z in (4, 6, 8)]
    assert len(merge_slices(dets, g, link_mm=3.0)) == 3  # 2 slices = 4 mm: beyond the link on its own
    [c] = merge_slices(dets, g, link_mm=3.0, step_mm=3.0)  # stage one looked at every second slice
    assert c.slices == 3 and c.z_range == (4, 8)
