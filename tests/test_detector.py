import io

import pytest
import torch
import torchvision

from noduledet.models import PRESETS, TABLES, VARIANTS, build_detector, build_from_spec
from noduledet.models.detector import DetectorSpec, NoduleAnchors, anchor_coverage, resolve_spec

SIZE = 64


def _target(boxes):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return {"boxes": boxes, "labels": torch.ones(len(boxes), dtype=torch.int64)}


def _mask_target(boxes):
    t = _target(boxes)
    masks = torch.zeros(len(t["boxes"]), SIZE, SIZE, dtype=torch.uint8)
    for m, (x1, y1, x2, y2) in zip(masks, t["boxes"].int().tolist()):
        m[y1:y2, x1:x2] = 1
    t["masks"] = masks
    return t


def test_tables_name_registered_variants():
    assert set(TABLES[3]) | set(TABLES[4]) == set(VARIANTS)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_trains_one_step_and_infers(variant):
    model = build_detector(variant)
    images = [torch.rand(3, SIZE, SIZE), torch.rand(3, SIZE, SIZE)]
    targets = [_target([[10, 12, 30, 28]]), _target([])]  # one image without a nodule
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = model.train()(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    opt.step()
    with torch.no_grad():
        out = model.eval()([torch.rand(3, SIZE, SIZE + 8)])[0]
    assert set(out) == {"boxes", "scores", "labels"}
    assert out["boxes"].shape[1] == 4 and len(out["boxes"]) <= PRESETS["tiny"].box_detections_per_img
    if len(out["boxes"]):
        assert out["boxes"][:, 2].max() <= SIZE + 8 and out["boxes"][:, 3].max() <= SIZE


def test_empty_image_has_zero_box_loss():
    losses = build_detector("ccapm").train()([torch.rand(3, SIZE, SIZE)], [_target([])])
    assert losses["loss_box_reg"] == 0


def test_every_parameter_gets_a_gradient():
    model = build_detector("ccapm", masks=True).train()
    losses = model([torch.rand(3, SIZE, SIZE)], [_mask_target([[8, 8, 40, 36]])])
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_mask_rcnn_trains_and_returns_masks():
    model = build_detector("ccasm", masks=True)
    losses = model.train()([torch.rand(3, SIZE, SIZE)], [_mask_target([[8, 8, 40, 36]])])
    assert "loss_mask" in losses and torch.isfinite(losses["loss_mask"])
    with torch.no_grad():
        out = model.eval()([torch.rand(3, SIZE, SIZE)])[0]
    assert out["masks"].shape[1:] == (1, SIZE, SIZE)


@pytest.mark.parametrize("in_channels", [1, 5])
def test_in_channels_is_the_number_of_slices(in_channels):
    for variant in ("ccapm", "vgg16", "efficientnet-b0", "mobilenet-v3-large"):
        model = build_detector(variant, in_channels=in_channels).eval()
        first = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
        assert first.in_channels == in_channels, variant
        with torch.no_grad():
            out = model([torch.rand(in_channels, SIZE, SIZE)])[0]
            assert out["boxes"].shape[1] == 4 and len(out["scores"]) == len(out["boxes"])
            with pytest.raises(RuntimeError, match="channels"):  # a slice of another depth is refused
                model([torch.rand(in_channels + 1, SIZE, SIZE)])


def test_no_resize_and_no_imagenet_normalisation():
    model = build_detector("res").eval()
    image = torch.rand(3, 70, 90)
    images, _ = model.transform([image])
    assert images.image_sizes == [(70, 90)]
    assert images.tensors.shape[-2:] == (96, 96)  # padded to a multiple of 32, not resized
    torch.testing.assert_close(images.tensors[0, :, :70, :90], image)


def test_integer_images_are_refused():
    with pytest.raises(TypeError, match="float tensors in \\[0, 1\\]"):
        build_detector("res").eval()([torch.zeros(3, SIZE, SIZE, dtype=torch.uint8)])


def test_anchors_cover_nodules_of_3_to_40_mm():
    """Every box of 3-40 mm at the working 0.7 mm per pixel has an anchor at IoU >= 0.5; before
    (sizes 4/6 .. 64/96, three aspect ratios, one centre per cell) 58% did and 8% reached 0.7."""
    best = anchor_coverage(resolve_spec("tiny"), (3 / 0.7, 40 / 0.7))
    assert (best >= 0.5).mean() >= 0.99 and (best >= 0.7).mean() >= 0.45 and best.min() > 0.45
    old = resolve_spec("tiny", anchor_sizes=((4, 6), (8, 12), (16, 24), (32, 48), (64, 96)),
                       aspect_ratios=(0.5, 1.0, 2.0), anchor_offsets=1)
    assert (anchor_coverage(old, (3 / 0.7, 40 / 0.7)) >= 0.5).mean() < 0.65


def test_offset_anchors_sit_a_quarter_stride_around_the_cell():
    from torchvision.models.detection.image_list import ImageList

    gen = NoduleAnchors(((4.0,),), ((1.0,),), offsets=4)
    anchors = gen(ImageList(torch.zeros(1, 3, 8, 8), [(8, 8)]), [torch.zeros(1, 4, 2, 2)])[0]
    assert gen.num_anchors_per_location() == [4] and anchors.shape == (16, 4)
    centres = ((anchors[:, :2] + anchors[:, 2:]) / 2)[:4]  # the first cell (0, 0): stride 4
    torch.testing.assert_close(centres, torch.tensor([[-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]]))
    torch.testing.assert_close(anchors[:, 2] - anchors[:, 0], torch.full((16,), 4.0))


def test_state_dict_round_trip():
    a = build_detector("ccapm", attention_options={"combine": "mul"}).eval()
    buf = io.BytesIO()
    torch.save({"spec": a.spec.to_dict(), "model": a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    b = build_from_spec("ccapm", DetectorSpec.from_dict(ckpt["spec"])).eval()
    b.load_state_dict(ckpt["model"])
    x = [torch.rand(3, SIZE, SIZE)]
    with torch.no_grad():
        torch.testing.assert_close(a.backbone(x[0][None])["0"], b.backbone(x[0][None])["0"])
    assert b.spec.attention_options == (("combine", "mul"),)


def test_unknown_option_and_variant_are_named():
    with pytest.raises(ValueError, match=r"unknown detector option\(s\) \['fpn_width'\]"):
        build_detector("res", fpn_width=32)
    with pytest.raises(ValueError, match="unknown variant 'resnet101'"):
        build_detector("resnet101")
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        build_detector("res", preset="huge")


@pytest.mark.parametrize("depth", [18, 50])
def test_plain_resnets_have_torchvision_layout(depth):
    """resnet18/resnet50 at width 1 load torchvision's state dict (less fc) exactly."""
    ours = build_detector(f"resnet{depth}", width=1.0).backbone.body
    theirs = getattr(torchvision.models, f"resnet{depth}")(weights=None).state_dict()
    theirs = {k: v for k, v in theirs.items() if not k.startswith("fc.")}
    assert list(ours.state_dict()) == list(theirs)
    ours.load_state_dict(theirs, strict=True)


def test_paper_preset_is_resnet50_width():
    spec = resolve_spec("paper")
    assert (spec.depth, spec.width, spec.fpn_channels) == (50, 1.0, 256)


@pytest.mark.slow
def test_paper_size_forward_512():
    model = build_detector("ccapm", preset="paper").eval()
    with torch.no_grad():
        out = model([torch.rand(3, 512, 512)])[0]
    assert out["boxes"].shape[1] == 4


def test_outputs_do_not_depend_on_the_first_image_seen():
    """RoIAlign's level scales are fixed, not guessed from the first (padded) image and kept."""
    torch.manual_seed(0)
    a = build_detector("res", box_score_thresh=0.0).eval()
    b = build_detector("res", box_score_thresh=0.0).eval()
    b.load_state_dict(a.state_dict())
    small, large = torch.rand(3, 40, 70), torch.rand(3, 256, 256)
    with torch.no_grad():
        a([large])
        first_large = a([small])[0]
        first_small = b([small])[0]
    torch.testing.assert_close(first_large["boxes"], first_small["boxes"])
    torch.testing.assert_close(first_large["scores"], first_small["scores"])
    assert a.roi_heads.box_roi_pool.scales == [0.25, 0.125, 0.0625, 0.03125]


# --- neck "c4": the Table 3 carrier without the pyramid ------------------------------------

def _has_fpn(model) -> bool:
    return any(isinstance(m, torchvision.ops.FeaturePyramidNetwork) for m in model.modules())


@pytest.mark.parametrize("variant", ["ccapm", "res", "vgg16", "mobilenet-v3-large"])
def test_c4_trains_with_an_empty_target_and_infers(variant):
    model = build_detector(variant, neck="c4")
    assert not _has_fpn(model) and _has_fpn(build_detector(variant))
    images = [torch.rand(3, SIZE, SIZE), torch.rand(3, SIZE, SIZE)]
    losses = model.train()(images, [_target([[10, 12, 30, 28]]), _target([])])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert build_detector(variant, neck="c4").train()([images[1]], [_target([])])["loss_box_reg"] == 0
    with torch.no_grad():
        out = model.eval()([torch.rand(3, SIZE, SIZE + 8)])[0]
    assert set(out) == {"boxes", "scores", "labels"} and out["boxes"].shape[1] == 4
    assert out["scores"].shape == out["labels"].shape == out["boxes"].shape[:1]


def test_c4_resnet_pools_one_stride_16_map_and_runs_layer4_per_roi():
    from noduledet.models.detector import Res5Head

    model = build_detector("ccapm", neck="c4").eval()
    feats = model.backbone(torch.rand(1, 3, SIZE, SIZE))
    assert list(feats) == ["0"] and feats["0"].shape[-2:] == (SIZE // 16, SIZE // 16)
    assert not hasattr(model.backbone.body, "layer4") and isinstance(model.roi_heads.box_head, Res5Head)
    assert model.roi_heads.box_roi_pool.scales == [1 / 16]
    assert model.rpn.anchor_generator.sizes == (PRESETS["tiny"].c4_anchor_sizes,)
    blocks = [m for m in model.modules() if type(m).__name__ == "CCAPM"]
    assert len(blocks) == 8  # every block of ResNet-18 keeps its attention, layer4's in the head


def test_c4_every_parameter_gets_a_gradient_with_masks():
    model = build_detector("ccasm", neck="c4", masks=True).train()
    losses = model([torch.rand(3, SIZE, SIZE)], [_mask_target([[8, 8, 40, 36]])])
    assert "loss_mask" in losses
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    with torch.no_grad():
        assert model.eval()([torch.rand(3, SIZE, SIZE)])[0]["masks"].shape[1:] == (1, SIZE, SIZE)


def test_neck_round_trips_and_bad_neck_is_named():
    a = build_detector("vgg16", neck="c4", c4_anchor_sizes=[16, 32])
    spec = DetectorSpec.from_dict(a.spec.to_dict())
    assert (spec.neck, spec.c4_anchor_sizes) == ("c4", (16, 32))
    build_from_spec("vgg16", spec).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match=r"neck='c5'; choose from \['fpn', 'c4'\]"):
        build_detector("res", neck="c5")


def test_paper_necks_follow_the_tables():
    from noduledet.models.detector import paper_neck

    assert {paper_neck(3, v) for v in TABLES[3]} == {"c4"}
    assert [v for v in TABLES[4] if paper_neck(4, v) == "c4"] == ["vgg16"]


def test_describe_variant_shows_form_and_neck():
    from noduledet.models.detector import describe_variant

    line = describe_variant("ccasm", attention_options={"form": "paper"}, neck="c4")
    assert line.startswith("ccasm: ResNet-18 x0.25, attention ccasm (form 'paper'") and "neck c4" in line
    assert "attention none" in describe_variant("res") and "neck fpn" in describe_variant("res")
    assert describe_variant("ccapm", "paper").startswith("ccapm: ResNet-50 x1, attention ccapm (form 'hou'")
