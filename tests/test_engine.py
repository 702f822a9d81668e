import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from noduledet import engine
from noduledet.cli import main
from noduledet.config import Config, Stage2Config, load_config
from noduledet.errors import UserError
from noduledet.runfolder import RunFolder


from tests.conftest import tiny_config as _cfg


def test_a_run_records_everything(trained):
    for name in ("config.yaml", "meta.json", "splits.json", "metrics.csv", "last.pt", "best.pt"):
        assert (trained / name).is_file(), name
    assert list((trained / "tb").iterdir())
    meta = json.loads((trained / "meta.json").read_text())
    assert meta["seed"] == 0 and meta["noduledet"] and "torch" in meta
    splits = json.loads((trained / "splits.json").read_text())
    assert not set(splits["train"]) & (set(splits["val"]) | set(splits["test"]))
    rows = (trained / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and "val_ap50" in rows[0] and "val_recall" in rows[0]
    ckpt = torch.load(trained / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and set(ckpt) >= {"model", "training", "config", "spec", "format"}
    assert set(ckpt["training"]) == {"optimizer", "scheduler", "scaler", "rng"}
    assert "training" not in torch.load(trained / "best.pt", weights_only=True)


def test_existing_run_is_not_overwritten(trained, phantom_root, phantom_cache):
    with pytest.raises(UserError, match="exists; pass --resume to continue it or --force"):
        engine.train(_cfg(phantom_root, phantom_cache, trained), log=None)


def test_force_starts_the_run_afresh(trained, phantom_root, phantom_cache, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "tb" / "events.out.tfevents.stale").write_text("old curves")
    engine.train(_cfg(phantom_root, phantom_cache, run, "train.epochs=1", "stage2.enabled=false"), force=True, log=None)
    assert len((run / "metrics.csv").read_text().splitlines()) == 2  # header + the new run's one epoch
    assert not (run / "tb" / "events.out.tfevents.stale").exists()
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1


def test_resume_continues_bit_for_bit(phantom_root, phantom_cache, tmp_path, monkeypatch):
    """Stage one's epochs (stage two after them resumes from the run's files: test_kill, slow)."""
    straight = _cfg(phantom_root, phantom_cache, tmp_path / "a", "stage2.enabled=false")
    engine.train(straight, log=None)
    interrupted = _cfg(phantom_root, phantom_cache, tmp_path / "b", "stage2.enabled=false")
    real = RunFolder.write_metrics

    def stop_after_first_epoch(self, history):
        real(self, history)
        if len(history) == 1:
            raise KeyboardInterrupt  # as if Ctrl-C hit after epoch 1 was saved

    monkeypatch.setattr(RunFolder, "write_metrics", stop_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        engine.train(interrupted, log=None)
    monkeypatch.setattr(RunFolder, "write_metrics", real)
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["epoch"] == 1
    engine.train(interrupted, resume=True, log=None)
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["history"][-1]["loss"] == b["history"][-1]["loss"]


def test_learning_rate_scales_with_the_total_batch():
    cfg = load_config(None, ["train.lr=0.02", "train.lr_batch=16", "train.batch_size=8"])
    assert engine.effective_lr(cfg, world=1) == pytest.approx(0.01)  # batch 8 on one process
    assert engine.effective_lr(cfg, world=4) == pytest.approx(0.04)  # 4 processes of 8: 32
    cfg.train.lr_batch = 0
    assert engine.effective_lr(cfg, world=4) == 0.02  # 0: the lr as given
    paper = load_config(Path(__file__).parents[1] / "configs" / "luna16-paper.yaml", [])
    assert engine.effective_lr(paper, world=1) == pytest.approx(paper.train.lr * paper.train.batch_size
                                                                / paper.train.lr_batch)


def test_config_errors_are_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  epochz: 3\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown key train.epochz; choose from" in err
    cfg.write_text("train: [1, 2\n")
    assert main(["train", str(cfg)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "none.yaml")]) == 2
    assert "no such config file" in capsys.readouterr().err
    cfg.write_text("data: {cache: " + str(tmp_path / "nocache") + "}\n")
    assert main(["train", str(cfg), f"train.out={tmp_path / 'r'}"]) == 2
    assert "no prepared cache, and data.root is not set" in capsys.readouterr().err


def test_evaluate_writes_both_metric_families(trained, phantom_root, tmp_path, capsys):
    from PIL import Image

    from noduledet.data.luna16 import PREDICTION_COLUMNS, Luna16, read_findings
    from noduledet.metrics.froc import froc

    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(trained / "best.pt"), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "mAP (AP@0.5)" in text and "CPM" in text
    report = json.loads((out / "metrics.json").read_text())
    test = json.loads((trained / "splits.json").read_text())["test"]
    assert report["scans_chosen"] == f"the run's test split ({trained / 'splits.json'})" and report["scans"] == len(test)
    table = read_findings(out / "candidates.csv", PREDICTION_COLUMNS)  # LUNA16's columns, the test scans' rows
    assert set(table.uids.tolist()) <= set(test)
    data = Luna16(phantom_root)
    again = froc(data.annotations(), data.excluded(), table, test, 100, 0)  # the CSV scores to the reported CPM
    assert report["froc"]["cpm"] == pytest.approx(again.cpm) and report["froc"]["sensitivities"] == pytest.approx(
        again.sensitivities.tolist())
    assert f"**{report['froc']['cpm']:.3f}**" in (out / "metrics.md").read_text()
    for name, size in (("froc.png", (660, 495)), ("pr.png", (550, 495))):  # figure inches x 110 dpi
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size == size
    assert main(["evaluate", "--checkpoint", str(trained / "best.pt"), "-o", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err


def test_evaluate_refuses_a_bad_checkpoint(tmp_path, capsys):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["evaluate", "--checkpoint", str(bad), "-o", str(tmp_path / "o")]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_froc_cli_by_hand(tmp_path, capsys):
    (tmp_path / "a.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\nA,0,0,0,10\nA,50,0,0,6\nB,0,0,0,8\n")
    (tmp_path / "e.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\nA,0,50,0,-1\n")
    (tmp_path / "c.csv").write_text("seriesuid,coordX,coordY,coordZ,probability\nA,1,1,1,0.9\nA,0,0,2,0.8\n"
                                    "A,0,52,0,0.95\nA,100,100,100,0.7\nA,51,0,0,0.3\nB,20,20,20,0.6\nB,10,0,0,0.99\n")
    assert main(["froc", "--annotations", str(tmp_path / "a.csv"), "--excluded", str(tmp_path / "e.csv"),
                 "--candidates", str(tmp_path / "c.csv"), "--bootstrap", "0", "--plot", str(tmp_path / "f.png")]) == 0
    out = capsys.readouterr().out
    assert "CPM 0.3810" in out and (tmp_path / "f.png").exists()
    (tmp_path / "bad.csv").write_text("seriesuid,x,y,z,p\n")
    assert main(["froc", "--annotations", str(tmp_path / "a.csv"), "--candidates", str(tmp_path / "bad.csv")]) == 2
    assert "missing column(s) ['coordX', 'coordY', 'coordZ', 'probability']" in capsys.readouterr().err


@pytest.mark.slow  # two processes: `python -m pytest -m slow`
def test_distributed_training_with_two_cpu_processes(phantom_root, phantom_cache, tmp_path, trained):
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(f"data: {{root: {phantom_root}, cache: {phantom_cache}, patch: 64, val_fraction: 0.25}}\n"
                   f"train: {{out: {tmp_path / 'run'}, epochs: 1, batch_size: 2, warmup_iters: 2, threads: 1}}\n"
                   "stage2: {epochs: 1, samples_per_epoch: 256}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29517", "-m", "noduledet.cli", "train", str(cfg)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    row = ckpt["history"][0]
    single = json.loads(Path(tmp_path / "run" / "splits.json").read_text())
    assert json.loads((tmp_path / "run" / "meta.json").read_text())["world_size"] == 2
    alone = torch.load(trained / "last.pt", weights_only=True)["history"][0]
    assert single["train"] == json.loads((trained / "splits.json").read_text())["train"]
    assert alone["images"] <= row["images"] <= alone["images"] + 1  # each image once, split over 2 ranks
    assert "val_ap50" in row
    assert proc.stdout.count("run: ") == 1  # rank 0 alone reports


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    """Every value the file sets is the loaded config's (nothing dropped or renamed), the rest defaults."""
    import yaml

    raw, cfg = yaml.safe_load(path.read_text()), load_config(path)
    loaded, defaults = cfg.to_dict(), Config().to_dict()
    for section, values in raw.items():
        for key, value in values.items():
            assert loaded[section][key] == value, f"{section}.{key}"
    unset = [(s, k) for s in defaults for k in defaults[s] if k not in raw.get(s, {})]
    assert unset and all(loaded[s][k] == defaults[s][k] for s, k in unset)


@pytest.mark.parametrize("override, message", [
    ("model.variant=ccpam", "model.variant='ccpam'; choose from ['ccapm', 'ccasm'"),
    ("model.preset=huge", "model.preset='huge'; choose from ['paper', 'tiny']"),
    ("train.optimizer=adam", "train.optimizer='adam'; choose from ['adamw', 'sgd']"),
    ("train.schedule=linear", "train.schedule='linear'; choose from ['cosine', 'step']"),
    ("eval.engine=tensorrt", "eval.engine='tensorrt'; choose from ['onnx', 'torch']"),
    ("train.device=gpu", "train.device='gpu'; choose from ['auto', 'cpu', 'cuda', 'cuda:N']"),
    ("train.epochs=three", "train.epochs: expected int, got 'three'"),
])
def test_config_values_are_checked_when_loaded(override, message):
    with pytest.raises(UserError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_a_checkpoint_from_before_the_blob_filter_flips_and_synthetic_cubes_goes_on_without_them(
        random_checkpoint, tmp_path, capsys):
    from noduledet import checkpoint

    stage2 = checkpoint.load(random_checkpoint).config.stage2
    assert (stage2.blobs, stage2.flips_top, stage2.synthetic) == (50, 32, Stage2Config.synthetic)  # the defaults, stored
    assert capsys.readouterr().err == ""  # nothing filled in, nothing said
    raw = torch.load(random_checkpoint, weights_only=True)
    for key in ("blobs", "flips_top"):
        del raw["config"]["stage2"][key]
    torch.save(raw, tmp_path / "old.pt")
    stage2 = checkpoint.load(tmp_path / "old.pt").config.stage2
    assert (stage2.blobs, stage2.flips_top, stage2.synthetic) == (0, 0, Stage2Config.synthetic)
    checkpoint.load(tmp_path / "old.pt")
    err = capsys.readouterr().err  # said once, naming what was filled in
    assert err == (f"noduledet: note: {tmp_path / 'old.pt'} predates stage2.blobs, stage2.flips_top; it runs with "
                   f"blobs=0, flips_top=0 (off), as it was trained\n")


def test_stage_two_is_trained_again_into_a_new_run_folder(trained, tmp_path, capsys, monkeypatch):
    """Other stage2 settings on the same stage one: the run left as it was, the copy with the new
    classifier, config and operating points, the mined candidates reused."""
    from noduledet import checkpoint, fpr

    monkeypatch.setattr(fpr, "mine", lambda *a, **k: pytest.fail("stage one's pool is unchanged: no mining"))
    before = {name: (trained / name).read_bytes() for name in ("best.pt", "last.pt", "config.yaml", "meta.json")}
    out = tmp_path / "smaller"
    assert main(["stage2", str(trained), "stage2.size=8", "stage2.width=2", "-o", str(out)]) == 0
    assert f"run: {out}" in capsys.readouterr().out
    assert {name: (trained / name).read_bytes() for name in before} == before
    old, new = checkpoint.load(trained / "best.pt"), checkpoint.load(out / "best.pt")
    assert (old.stage2["spec"]["size"], old.stage2["spec"]["width"]) == (12, 4)
    assert (new.stage2["spec"]["size"], new.stage2["spec"]["width"]) == (8, 2)
    assert new.config.stage2.size == 8 and load_config(out / "config.yaml").stage2.size == 8
    assert new.config.train.out == load_config(out / "config.yaml").train.out == str(out)
    assert new.operating_points["scans"] == old.operating_points["scans"] > 0
    assert len(new.operating_points["max_findings"]) == 4 and min(new.operating_points["max_findings"]) >= 1
    assert all(torch.equal(v, new.model[k]) for k, v in old.model.items())  # stage one kept
    resumable = checkpoint.load(out / "last.pt")
    assert resumable.stage2["spec"]["size"] == 8 and resumable.training is not None
    assert (out / "stage2_candidates.json").read_bytes() == (trained / "stage2_candidates.json").read_bytes()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["stage2_retrained"]["overrides"] == ["stage2.size=8", "stage2.width=2"]
    assert meta["seed"] == json.loads(before["meta.json"])["seed"]


def test_stage_two_trained_again_in_place_mines_again_when_the_pool_changes(trained, tmp_path, monkeypatch):
    from noduledet import checkpoint, fpr

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    pools, proposers = [], []
    mine, train_proposer = fpr.mine, engine.train_proposer
    monkeypatch.setattr(fpr, "mine", lambda pipeline, *a, **k: pools.append(pipeline.config.stage2.blobs) or mine(pipeline, *a, **k))
    monkeypatch.setattr(engine, "train_proposer", lambda cfg, *a, **k: proposers.append(cfg.proposer.steps) or train_proposer(cfg, *a, **k))
    with pytest.raises(UserError, match="has a second stage already; pass --force to replace it, or -o"):
        engine.retrain_stage2(run, ["stage2.blobs=0"], log=None)
    assert checkpoint.load(run / "best.pt").config.stage2.blobs == 50 and not pools  # refused before any change
    engine.retrain_stage2(run, ["stage2.blobs=0"], force=True, log=None)
    assert pools == [0] and proposers == []  # the pool changed, the proposer did not: it is kept
    assert checkpoint.load(run / "best.pt").config.stage2.blobs == 0
    assert checkpoint.load(run / "last.pt").stage2 is not None
    engine.retrain_stage2(run, ["proposer.steps=3"], force=True, log=None)
    assert pools == [0, 0] and proposers == [3]  # a new proposer: trained, and the pool mined again
    assert checkpoint.load(run / "last.pt").proposer is not None


def test_stage_two_trained_again_leaves_no_half_made_run_folder(trained, tmp_path, monkeypatch):
    from noduledet import fpr

    def fail(*args, **kwargs):
        raise RuntimeError("stopped while fitting")

    monkeypatch.setattr(fpr, "fit", fail)
    with pytest.raises(RuntimeError, match="stopped while fitting"):
        engine.retrain_stage2(trained, ["stage2.size=8"], out=tmp_path / "new", log=None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["train.epochs=3"], "override 'train.epochs=3': only stage2.* and proposer.* settings change here (stage one is kept)"),
    (["stage2.enabled=false"], "stage2.enabled=false leaves nothing to train"),
    (["stage2.combine=max"], "stage2.combine='max'; choose from"),
    (["-o", "{trained}"], "has a second stage already; pass --force"),
    (["-o", "{exists}"], "exists; pass --force to replace it"),
])
def test_training_stage_two_again_refuses_in_one_line(trained, tmp_path, capsys, args, message):
    exists = tmp_path / "exists"
    exists.mkdir()
    (exists / "notes.txt").write_text("mine")
    args = [a.format(trained=trained, exists=exists) for a in args]
    assert main(["stage2", str(trained), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert (exists / "notes.txt").read_text() == "mine"


def test_training_stage_two_again_needs_a_finished_stage_one(trained, tmp_path, capsys):
    from noduledet import checkpoint

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    ckpt = checkpoint.load(run / "last.pt")
    ckpt.epoch = 1
    checkpoint.save(ckpt, run / "last.pt")
    assert main(["stage2", str(run), "--force"]) == 2
    assert "stage one stopped after epoch 1 of 2; finish it first" in capsys.readouterr().err
    assert main(["stage2", str(tmp_path / "none")]) == 2
    assert "last.pt: no such checkpoint" in capsys.readouterr().err


def test_training_without_validation_scans_keeps_the_last_epoch_and_says_so(phantom_root, phantom_cache, tmp_path):
    """best.pt is never chosen on the test scans: with no validation scans it is the last epoch."""
    lines = []
    cfg = _cfg(phantom_root, phantom_cache, tmp_path / "run", "data.val_fraction=0", "stage2.enabled=false")
    result = engine.train(cfg, log=lines.append)
    assert lines[0].startswith("no validation scans (data.val_fraction, data.val_subsets): best.pt is the last epoch")
    assert json.loads((tmp_path / "run" / "splits.json").read_text())["val"] == []
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert best["epoch"] == 2 and not any(k.startswith("val_") for row in best["history"] for k in row)
    assert result["best"] == float("-inf")


def test_training_refuses_a_cache_of_other_region_settings(phantom_root, phantom_cache, tmp_path):
    cfg = _cfg(phantom_root, phantom_cache, tmp_path / "run", "data.margin_mm=20")
    with pytest.raises(UserError, match=r"a cache made with data\.margin_mm=10\.0 \(the config: 20\.0\); prepare one"):
        engine.open_cache(cfg)


def test_evaluate_takes_no_scans_it_was_not_told_to(random_checkpoint, phantom_root, phantom_cache, tmp_path, capsys):
    """No splits.json, an empty split, scans the data lacks, subsets it lacks, a cache of other settings:
    each refused in one line naming what chooses scans explicitly; nothing is written."""
    from noduledet import checkpoint

    run = tmp_path / "run"
    run.mkdir()
    ckpt = checkpoint.load(random_checkpoint)
    ckpt.config.data.root, ckpt.config.data.cache = str(phantom_root), str(phantom_cache)
    checkpoint.save(ckpt, run / "best.pt")
    out = tmp_path / "eval"

    def refused(*extra) -> str:
        assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "-o", str(out), *map(str, extra)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and not out.exists()
        return err

    choose = "choose the scans with --subset N [N ...] or --split all (every scan of --data)"
    assert f"{run / 'splits.json'}: missing, so the run's test split is unknown; {choose}" in refused()
    (run / "splits.json").write_text(json.dumps({"train": ["a"], "val": ["b"], "test": []}))
    assert f"{run / 'splits.json'}: the run's test split is empty; {choose}" in refused()
    assert "1 of the run's 1 val scans are not in the data (first: b); pass --data" in refused("--split", "val")
    assert "--subset 9: no scan of the data is in these LUNA16 subsets" in refused("--subset", 9)
    other = tmp_path / "other-cache"
    other.mkdir()
    manifest = json.loads((phantom_cache / "manifest.json").read_text())
    manifest["settings"]["margin_mm"] = 20.0
    (other / "manifest.json").write_text(json.dumps(manifest))
    assert "a cache made with data.margin_mm=20.0 (the config: 10.0)" in refused("--cache", other, "--split", "all")
    assert "no prepared cache" in refused("--cache", tmp_path / "none", "--split", "all")
