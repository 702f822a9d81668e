"""What a GPU runs, checked where a CPU can: bf16 autocast at inference and in a training step,
DataLoader workers, the CUDA random state of a resumed run, and benchmarks/gpu_check.py itself."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models.detection._utils import BoxCoder

from noduledet import checkpoint, engine
from noduledet.config import Config, EvalConfig
from noduledet.data.cache import SliceCache
from noduledet.data.dataset import collate
from noduledet.data.lung import ScanRegion
from noduledet.geometry import Geometry
from noduledet.inference import Detector
from noduledet.models import build_detector
from noduledet.pipeline import Pipeline
from tests.conftest import tiny_config
from tests.test_pipeline import _chest_with_nodule

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def test_boxes_and_anchors_stay_fp32_under_bf16_autocast():
    """torchvision decodes in the regression's dtype: in bf16 a corner near 400 px moves by up to
    2 px. Ours decodes the same bf16 regression in fp32."""
    model = build_detector("res", box_score_thresh=0.0)
    proposals = [torch.tensor([[401.3, 377.9, 431.7, 409.2], [280.6, 300.2, 290.9, 310.4]])]
    deltas = (0.3 * torch.randn(2, 8)).bfloat16()
    exact = BoxCoder((10.0, 10.0, 5.0, 5.0)).decode(deltas.float(), proposals)
    with torch.autocast(**BF16):
        ours = model.roi_heads.box_coder.decode(deltas, proposals)
        theirs = BoxCoder((10.0, 10.0, 5.0, 5.0)).decode(deltas, proposals)
    assert ours.dtype == torch.float32 and torch.equal(ours, exact)
    assert (theirs.float() - exact).abs().max() > 0.4  # what the fp32 decoder saves
    model.eval()
    with torch.no_grad(), torch.autocast(**BF16):
        model([torch.rand(3, 96, 96)])  # bf16 feature maps ...
    assert all(a.dtype == torch.float32 for a in model.rpn.anchor_generator.cell_anchors)  # ... fp32 anchors


def test_candidates_under_bf16_autocast_match_fp32_within_half_a_millimetre():
    """An untrained detector (every box kept) on a chest of 400 px of 0.7 mm: bf16 would round its
    boxes beyond 256 px to 2 px (1.4 mm); the candidates stay where fp32 puts them."""
    torch.manual_seed(0)
    model = build_detector("res", box_score_thresh=0.0)
    volume, _ = _chest_with_nodule(False)
    big = np.kron(volume.hu[16:24], np.ones((1, 5, 5), dtype=np.int16))  # 80 -> 400 px
    g = Geometry((0.7, 0.7, 1.5), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), big.shape)
    found = {}
    for precision in ("fp32", "bf16"):
        detector = Detector(model, (-1.5, 0.0, 1.5), (-1000.0, 400.0), channels_last=False, precision=precision)
        pipeline = Pipeline(detector, EvalConfig(slice_step_mm=0.0, max_candidates=20), Config())
        found[precision] = pipeline.run(big, g, ScanRegion((0, 0, 0), big.shape, (3, 4))).candidates
    fp32, bf16 = (np.array([c.world_xyz for c in found[p]]) for p in ("fp32", "bf16"))
    assert len(fp32) >= 10 and fp32[:, 0].max() > 256 * 0.7  # boxes beyond 256 px are among them
    nearest = np.linalg.norm(fp32[:10, None] - bf16[None], axis=-1).min(axis=1)
    assert nearest.max() <= 0.5, nearest


def _train_items(phantom_root, phantom_cache, tmp_path, *extra):
    cfg = tiny_config(phantom_root, phantom_cache, tmp_path / "run", *extra)
    cache = SliceCache(phantom_cache)
    train_ds, _ = engine.make_datasets(cfg, cache, engine.make_splits(cfg, cache))
    return cfg, train_ds


def test_an_amp_training_step_under_bf16_autocast_on_the_cpu(phantom_root, phantom_cache, tmp_path):
    cfg, train_ds = _train_items(phantom_root, phantom_cache, tmp_path, "train.batch_size=1", "model.masks=true")
    trainer = engine.make_trainer(cfg, torch.device("cpu"), 1, 1e-3, amp_dtype=torch.bfloat16)
    assert trainer.amp_dtype == torch.bfloat16 and not trainer.scaler.is_enabled()  # bf16 needs no loss scaling
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(train_ds, [0]), batch_size=1, collate_fn=collate)
    row = engine.train_one_epoch(trainer, trainer.model, loader, cfg.train.grad_clip)  # a positive patch
    assert row["images"] == 1 and np.isfinite(row["loss"]) and row["loss_box_reg"] > 0 and row["loss_mask"] > 0
    after = trainer.model.state_dict()
    assert all(v.dtype == before[k].dtype for k, v in after.items())  # the weights stay fp32
    assert any(not torch.equal(v, before[k]) for k, v in after.items() if v.is_floating_point())


def test_data_loader_workers_give_the_batches_of_the_main_process(phantom_root, phantom_cache, tmp_path):
    """Both LUNA16 configs load with 8 workers: an item depends on (seed, epoch, index) alone."""
    batches = {}
    for workers in (0, 2):
        cfg, train_ds = _train_items(phantom_root, phantom_cache, tmp_path, f"train.workers={workers}")
        loader = engine._loader(cfg, train_ds, epoch=1)
        assert loader.num_workers == workers
        batches[workers] = [b for _, b in zip(range(2), loader)]
    for (images_a, targets_a, infos_a), (images_b, targets_b, infos_b) in zip(batches[0], batches[2]):
        assert infos_a == infos_b
        assert all(torch.equal(a, b) for a, b in zip(images_a, images_b))
        assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(targets_a, targets_b))


def _trainer(device: str) -> tuple[engine.Trainer, Config]:
    cfg = Config()
    model = build_detector("res")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return engine.Trainer(model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False),
                          torch.device(device), None), cfg


def test_the_cuda_random_state_goes_through_a_checkpoint_and_back(monkeypatch, tmp_path, capsys):
    saved = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]  # two GPUs' states
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: saved)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    trainer, cfg = _trainer("cuda")
    state = trainer.state()
    ckpt = checkpoint.Checkpoint("res", trainer.model.spec.to_dict(), cfg, trainer.model.state_dict(), 1, 0.5, [],
                                 state)
    checkpoint.save(ckpt, tmp_path / "last.pt")  # through torch.save and a weights-only load
    back = checkpoint.load(tmp_path / "last.pt")
    trainer.restore(back)
    assert len(restored) == 1 and all(torch.equal(a, b) for a, b in zip(restored[0], saved))
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # resumed on a machine with one GPU
    trainer.restore(back)
    assert len(restored) == 1  # not set: it would fail on the second GPU's state
    assert "saved the random state of 2 GPU(s), this process has 1: the run goes on, not bit for bit" in \
        capsys.readouterr().err
    cpu, _ = _trainer("cpu")
    cpu.restore(back)  # a GPU run resumed on the CPU: nothing to set, said once
    assert len(restored) == 1 and "this process has 0" in capsys.readouterr().err


def test_gpu_check_runs_its_road_on_the_cpu(phantom_root, phantom_cache, tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    import gpu_check

    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--smoke", "--steps", "2", "--data", str(phantom_root), "--cache", str(phantom_cache),
                           "--out", str(out)]) == 0
    report = json.loads(out.read_text())  # what the GPU run writes, measured on the CPU road
    assert report["smoke"] and report["ok"] and report["preset"] == "tiny" and report["masks"]  # the config's Mask R-CNN
    assert report["train"]["steps"] == 2 and report["train"]["workers"] == 2 and np.isfinite(report["train"]["loss"])
    c = report["candidates"]
    assert c["slices"] == 16 and c["compared"] == min(20, c["candidates_fp32"]) > 0
    assert 0 <= c["within_0_5_mm"] <= c["compared"] and c["fp32_ms_per_slice"] > 0 and c["bf16_ms_per_slice"] > 0
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    try:
        assert gpu_check.main([]) == 2
    finally:
        monkeypatch.undo()
    assert "needs a CUDA GPU" in capsys.readouterr().err
