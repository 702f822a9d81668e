"""Training and per-epoch validation (``noduledet train``), single process or under torchrun.

Split as torchvision's detection references: ``train`` sets up data, model and optimiser and
loops over epochs; ``train_one_epoch`` runs the steps of one epoch; ``validate`` scores the
validation slices. The run folder (``RunFolder``) holds what is written. ``retrain_stage2``
(``noduledet stage2``) trains a finished run's second stage again, its stage one kept.

Checkpoints (``noduledet.checkpoint``) hold the model, optimiser, scheduler, gradient scaler,
epoch and torch RNG state. ``--resume`` continues from ``last.pt`` exactly: on the CPU a resumed
run ends with the same weights, bit for bit, as one that was never interrupted (data randomness
derives from (seed, epoch, index) alone; the model's sampling RNG is restored).

Under ``torchrun`` (gloo on the CPU, nccl on GPUs) each process trains on its share of every
epoch (DistributedSampler), validation is sharded and gathered, and rank 0 alone logs and writes.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from noduledet import checkpoint
from noduledet.checkpoint import Checkpoint
from noduledet.config import Config, apply_overrides, config_from_dict, config_yaml
from noduledet.data.cache import SliceCache, cache_mismatch, cache_ready, prepare
from noduledet.data.dataset import SliceDataset, collate
from noduledet.data.luna16 import Luna16
from noduledet.data.splits import split_scans
from noduledet.distributed import barrier, gather, join_torchrun, rank_and_world, resolve_device
from noduledet.errors import UserError
from noduledet.fpr import stage2_done, train_stage2
from noduledet.metrics.coco import slice_metrics
from noduledet.models.detector import build_detector
from noduledet.progress import Progress, track
from noduledet.proposer import proposer_state, train_proposer
from noduledet.records import read_meta, write_meta
from noduledet.runfolder import RunFolder, git_hash
from noduledet.staging import staged_dir, write_text

VALIDATION_KEYS = ("ap50", "ap", "ap10", "recall", "precision", "f1", "jaccard")


# ---- pieces ---------------------------------------------------------------------------------

def open_cache(cfg: Config) -> SliceCache:
    """The configured cache, prepared from ``data.root`` first when it does not exist yet; one
    made of other data (``data.root``'s scans and annotations) or with other region settings
    (``data.margin_mm``, ``data.z_margin_mm``, ``data.lidc_masks``) is refused."""
    if not cfg.data.cache:
        raise UserError("data.cache is not set (the folder of `noduledet prepare`)")
    cache = Path(cfg.data.cache)
    if not cache_ready(cache):
        if not cfg.data.root:
            raise UserError(f"{cache}: no prepared cache, and data.root is not set to prepare one")
        if rank_and_world()[0] == 0:
            print(f"preparing the cache {cache} from {cfg.data.root}", flush=True)
            prepare(cfg.data.root, cache, cfg.data)
        barrier()
    differs = cache_mismatch(cache, cfg.data, Luna16(cfg.data.root) if cfg.data.root else None)
    if differs:
        raise UserError(f"{cache}: a cache made with {', '.join(differs)}; prepare one with this config "
                        f"(noduledet prepare DATA --cache NEW --config CONFIG) and set data.cache")
    return SliceCache(cache)


def make_splits(cfg: Config, cache: SliceCache) -> dict[str, list[str]]:
    d = cfg.data
    subset_of = {u: cache.subset(u) for u in cache.uids}
    splits = split_scans(cache.uids, subset_of, d.test_fraction, d.val_fraction, tuple(d.test_subsets),
                         tuple(d.val_subsets), d.split_seed)
    if not splits["train"]:
        raise UserError(f"no training scans left after the split ({len(cache.uids)} scans in {cache.root})")
    return splits


def make_datasets(cfg: Config, cache: SliceCache, splits: dict) -> tuple[SliceDataset, SliceDataset | None]:
    """Training patches of the training scans; whole validation slices that cut a nodule (None
    without validation scans: the test scans never choose a checkpoint)."""
    d = cfg.data
    common = dict(offsets_mm=d.offsets_mm, window_hu=d.window_hu, pixel_mm=d.pixel_mm, masks=cfg.model.masks,
                  min_section=d.min_section, seed=cfg.train.seed)
    train_ds = SliceDataset(cache, splits["train"], train=True, patch=d.patch, negatives=d.negatives,
                            augment=d.augment, **common)
    val_ds = SliceDataset(cache, splits["val"], train=False, slices="positive", slice_stride=d.eval_slice_stride,
                          **common) if splits["val"] else None
    if len(train_ds) == 0:
        raise UserError(f"no training slices with nodules in {len(splits['train'])} training scans")
    return train_ds, val_ds


def make_model(cfg: Config) -> torch.nn.Module:
    """The detector of ``cfg.model``: one input channel per ``data.offsets_mm``, Mask R-CNN with
    ``model.masks`` (``model.options`` may set neither: ``config`` refuses them)."""
    options = {**cfg.model.options, "in_channels": len(cfg.data.offsets_mm), "masks": cfg.model.masks}
    try:
        return build_detector(cfg.model.variant, cfg.model.preset, **options)
    except ValueError as err:
        raise UserError(f"model: {err}") from None


def effective_lr(cfg: Config, world: int) -> float:
    """``train.lr``, scaled linearly to the total batch (``batch_size`` x processes) when
    ``train.lr_batch`` names the batch it was given for (Goyal et al. 2017)."""
    t = cfg.train
    return t.lr * t.batch_size * world / t.lr_batch if t.lr_batch else t.lr


def make_optimizer(cfg: Config, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW; no weight decay on norms and biases."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=t.momentum)
    return torch.optim.AdamW(groups, lr=lr)


def lr_factor(cfg: Config, step: int, total: int) -> float:
    """Linear warm-up, then cosine to 0 or steps of 0.1 at ``milestones`` (fractions)."""
    t = cfg.train
    warm = min(t.warmup_iters, max(total // 5, 1))
    if step < warm:
        return 0.001 + (1 - 0.001) * step / warm
    if t.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))
    return 0.1 ** sum(step >= m * total for m in t.milestones)


@dataclass
class Trainer:
    """The model and everything that steps it, with the state a checkpoint saves."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype on a GPU, None on the CPU
    epoch: int = 0
    best: float = -math.inf
    history: list[dict] = field(default_factory=list)

    def state(self) -> dict:
        """The resume state of ``last.pt``."""
        cuda = self.device.type == "cuda"
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if cuda else []}}

    def restore(self, ckpt: Checkpoint) -> None:
        if ckpt.variant != self.model.variant:
            raise UserError(f"{ckpt.path}: a {ckpt.variant} run; the config says model.variant={self.model.variant}")
        checkpoint.load_weights(self.model, ckpt.model, ckpt.path, f"the {self.model.variant} variant of the config")
        s = ckpt.training
        self.optimizer.load_state_dict(s["optimizer"])
        self.scheduler.load_state_dict(s["scheduler"])
        self.scaler.load_state_dict(s["scaler"])
        self.epoch, self.best, self.history = ckpt.epoch, ckpt.best, list(ckpt.history)
        torch.set_rng_state(s["rng"]["torch"])
        cuda = s["rng"]["cuda"]
        if self.device.type == "cuda" and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        elif self.device.type == "cuda" or cuda:  # resumed on another machine: the sampling differs from here on
            print(f"noduledet: note: {ckpt.path} saved the random state of {len(cuda)} GPU(s), this process has "
                  f"{torch.cuda.device_count() if self.device.type == 'cuda' else 0}: the run goes on, not bit for bit",
                  file=sys.stderr)


def training_autocast(cfg: Config, device: torch.device) -> torch.dtype | None:
    """Training's autocast dtype: with ``train.amp`` on a GPU bf16, or fp16 (with a gradient
    scaler) where the GPU lacks bf16; None (fp32) on the CPU."""
    if not (cfg.train.amp and device.type == "cuda"):
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def make_trainer(cfg: Config, device: torch.device, total_steps: int, lr: float, amp_dtype: torch.dtype | None = None,
                 ) -> Trainer:
    """Model, optimiser, schedule and gradient scaler; ``amp_dtype`` (default
    ``training_autocast(cfg, device)``) the autocast dtype of the steps: the tests and
    ``benchmarks/gpu_check.py --smoke`` take bf16 on the CPU, the GPU's road."""
    t = cfg.train
    model = make_model(cfg).to(device)
    if device.type == "cuda" and t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model, lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s, total_steps))
    dtype = amp_dtype or training_autocast(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    return Trainer(model, optimizer, scheduler, scaler, device, dtype)


def _loader(cfg: Config, dataset: SliceDataset, epoch: int) -> DataLoader:
    """This epoch's batches: a shuffle from (seed, epoch) alone, shared out under torchrun."""
    dataset.set_epoch(epoch)
    if rank_and_world()[1] > 1:
        sampler = DistributedSampler(dataset, shuffle=True, seed=cfg.train.seed)
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(cfg.train.seed * 1000 + epoch))
    return DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=sampler, collate_fn=collate,
                      num_workers=cfg.train.workers, drop_last=False)


# ---- one epoch, validation ------------------------------------------------------------------

def train_one_epoch(trainer: Trainer, net: torch.nn.Module, loader: DataLoader, grad_clip: float,
                    progress: Progress | None = None) -> dict:
    """One pass over ``loader``; ``net`` is the model or its DDP wrapper. Returns the epoch's row:
    mean losses over every rank's images, images seen, learning rate, seconds, images per second."""
    net.train()
    sums: dict[str, float] = {}
    seen, t0 = 0, time.perf_counter()
    for images, targets, _ in track(progress, loader, total=len(loader)):
        images = [im.to(trainer.device, non_blocking=True) for im in images]
        targets = [{k: v.to(trainer.device) for k, v in t.items()} for t in targets]
        with torch.autocast(trainer.device.type, dtype=trainer.amp_dtype or torch.bfloat16,
                            enabled=trainer.amp_dtype is not None):
            losses = net(images, targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss is {loss.item()} at epoch {trainer.epoch + 1}: lower train.lr or check the data")
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.scaler.scale(loss).backward()
        if grad_clip > 0:
            trainer.scaler.unscale_(trainer.optimizer)
            torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), grad_clip)
        trainer.scaler.step(trainer.optimizer)
        trainer.scaler.update()
        trainer.scheduler.step()
        for k, v in {**losses, "loss": loss}.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(images)
        seen += len(images)
    parts = gather((sums, seen))
    seen_all = sum(s for _, s in parts)
    seconds = time.perf_counter() - t0
    return {"epoch": trainer.epoch + 1, "images": seen_all,
            **{k: sum(p[0].get(k, 0.0) for p in parts) / max(seen_all, 1) for k in sums},
            "lr": trainer.scheduler.get_last_lr()[0], "train_s": seconds, "images_per_s": seen_all / seconds}


@torch.inference_mode()
def predict_dataset(model: torch.nn.Module, dataset: SliceDataset, device: torch.device,
                    batch_size: int = 8) -> tuple[list[dict], list[dict]]:
    """Predictions and targets of this rank's share of ``dataset`` (numpy, CPU)."""
    rank, world = rank_and_world()
    model.eval()
    indices = list(range(rank, len(dataset), world))
    preds, targets = [], []
    for start in range(0, len(indices), batch_size):
        items = [dataset[i] for i in indices[start:start + batch_size]]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            outputs = model([im.to(device) for im, _, _ in items])
        for (_, t, _), o in zip(items, outputs):
            p = {"boxes": o["boxes"].float().cpu().numpy(), "scores": o["scores"].float().cpu().numpy()}
            if "masks" in o:
                p["masks"] = (o["masks"][:, 0] >= 0.5).cpu().numpy()
            preds.append(p)
            targets.append({k: v.numpy() for k, v in t.items()})
    return preds, targets


def validate(model: torch.nn.Module, dataset: SliceDataset, device: torch.device, cfg: Config) -> dict:
    """Slice metrics over the whole dataset, gathered across ranks, at the run's operating point."""
    parts = gather(predict_dataset(model, dataset, device, cfg.eval.batch_size))
    preds = [p for part in parts for p in part[0]]
    targets = [t for part in parts for t in part[1]]
    return slice_metrics(preds, targets, cfg.eval.score_threshold, cfg.eval.iou_threshold)


# ---- training -------------------------------------------------------------------------------

def train(cfg: Config, resume: bool = False, force: bool = False, progress: Progress | None = None,
          log=print, scans: Progress | None = None) -> dict:
    """Train ``cfg.model`` on ``cfg.data`` for ``cfg.train.epochs`` epochs, then the second stage
    (``noduledet.fpr``) when ``cfg.stage2.enabled``.

    Args:
        progress: a reporter for the batches of each epoch (``noduledet.progress``), or None.
        log: where the line per epoch goes (rank 0), or None.
        scans: a reporter for the second stage's passes over scans, or None.

    Returns:
        {"run": run dir, "best": best validation mAP, "history": per-epoch rows}.
    """
    t = cfg.train
    device = join_torchrun(resolve_device(t.device))
    rank, world = rank_and_world()
    if t.threads:
        torch.set_num_threads(t.threads)
    run = RunFolder(t.out, resume, force, cfg)
    barrier()  # every rank has checked before rank 0 writes
    torch.manual_seed(t.seed)
    cache = open_cache(cfg)
    splits = make_splits(cfg, cache)
    train_ds, val_ds = make_datasets(cfg, cache, splits)
    per_epoch = math.ceil(len(train_ds) / world / t.batch_size)
    lr = effective_lr(cfg, world)
    if rank == 0 and log and t.lr_batch:
        log(f"learning rate {lr:g}: {t.lr:g} for a batch of {t.lr_batch}, scaled to {t.batch_size} per process "
            f"x {world} process(es)")
    if rank == 0 and log and val_ds is None:
        log("no validation scans (data.val_fraction, data.val_subsets): best.pt is the last epoch, chosen on no "
            "scans, and stage two gets no operating points; the test scans choose nothing")
    trainer = make_trainer(cfg, device, per_epoch * t.epochs, lr)
    if run.resuming:
        trainer.restore(checkpoint.load(run.last))
    elif rank == 0:
        run.start(cfg, splits, device, world)
    net = torch.nn.parallel.DistributedDataParallel(trainer.model) if world > 1 else trainer.model
    writer = run.tensorboard() if rank == 0 else None
    while trainer.epoch < t.epochs:
        row = train_one_epoch(trainer, net, _loader(cfg, train_ds, trainer.epoch), t.grad_clip,
                              progress if rank == 0 else None)
        if val_ds is not None and (row["epoch"] % t.val_every == 0 or row["epoch"] == t.epochs):
            v0 = time.perf_counter()
            m = validate(trainer.model, val_ds, device, cfg)
            row.update({f"val_{k}": m[k] for k in VALIDATION_KEYS}, val_s=time.perf_counter() - v0)
        _end_epoch(trainer, row, cfg, run, writer, log if rank == 0 else None, validating=val_ds is not None)
    if writer is not None:
        writer.close()
    if cfg.stage2.enabled and rank == 0:
        train_after_stage_one(cfg, run, cache, splits, device, log, scans)
    barrier()
    return {"run": str(run.path), "best": trainer.best, "history": trainer.history}


def train_after_stage_one(cfg: Config, run: RunFolder, cache: SliceCache, splits: dict, device: torch.device,
                          log=print, scans: Progress | None = None) -> None:
    """The 3D proposer (when ``proposer.enabled``), then the second stage and its operating
    points, each saved into the run's checkpoints; a part already there is kept (``--resume``)."""
    if cfg.proposer.enabled and checkpoint.load(run.last).proposer is None:
        run.update(proposer=proposer_state(train_proposer(cfg, cache, splits["train"], device, log)))
    if not stage2_done(run.last):
        train_stage2(cfg, run, cache, splits, device, log, scans)


def _end_epoch(trainer: Trainer, row: dict, cfg: Config, run: RunFolder, writer, log, validating: bool = True) -> None:
    """Record the epoch: history, best score, checkpoints, metrics.csv, TensorBoard, a log line.
    Without ``validating`` (no validation scans) every epoch is the best so far: best.pt is the last."""
    trainer.epoch = row["epoch"]
    trainer.history.append(row)
    score = row.get("val_ap50", math.nan)
    score = score if math.isfinite(score) else -math.inf  # no validation nodules: no score
    improved = score > trainer.best or not run.best.exists() or not validating
    trainer.best = max(trainer.best, score)
    if writer is None:  # not rank 0
        return
    model = trainer.model
    run.save(Checkpoint(model.variant, model.spec.to_dict(), cfg, model.state_dict(), trainer.epoch, trainer.best,
                        trainer.history, trainer.state()), improved)
    run.write_metrics(trainer.history)
    for k, v in row.items():
        if k != "epoch" and isinstance(v, float) and math.isfinite(v):
            writer.add_scalar(k, v, trainer.epoch)
    writer.flush()
    if log:
        msg = f"epoch {trainer.epoch}/{cfg.train.epochs}: loss {row['loss']:.3f}, {row['train_s']:.0f} s"
        if "val_ap50" in row:
            msg += (f"; val mAP {row['val_ap50']:.3f}, recall {row['val_recall']:.3f}, "
                    f"F1 {row['val_f1']:.3f} ({row['val_s']:.0f} s)")
        log(msg)


def retrain_stage2(run_dir: str | Path, overrides: list[str] = (), out: str | Path | None = None,
                   force: bool = False, log=print, progress=None) -> Path:
    """Train what follows stage one in a finished run again, its stage one kept: with other
    ``stage2`` or ``proposer`` settings (``overrides``, ``stage2.key=value``) or after a change to
    their code. The 3D proposer is trained again when its settings changed (or the run has none).

    Args:
        run_dir: a run folder whose stage one has trained all its epochs.
        out: a new run folder, the run copied into it (the run itself is left as it was); it
            appears only once its second stage is trained. None: in place, which replaces a
            second stage the run has only with ``force``.
        force: replace ``out`` if it exists, or the run's own second stage.

    The pool mined on the training scans is reused unless the proposer or the pool's settings
    (``stage2.candidates``, ``stage2.blobs``, ``proposer.candidates``) changed; the operating
    points are calibrated anew. Returns the run folder that holds the new second stage (``out``
    or ``run_dir``).
    """
    src = Path(run_dir)
    last = checkpoint.load(src / "last.pt")
    if last.epoch < last.config.train.epochs:
        raise UserError(f"{src}: stage one stopped after epoch {last.epoch} of {last.config.train.epochs}; "
                        f"finish it first (noduledet train {src / 'config.yaml'} --resume)")
    foreign = [o for o in overrides if not o.startswith(("stage2.", "proposer."))]
    if foreign:
        raise UserError(f"override {foreign[0]!r}: only stage2.* and proposer.* settings change here (stage one is "
                        f"kept); train anew for others")
    cfg = config_from_dict(apply_overrides(last.config.to_dict(), list(overrides), str(src)), f"{src} with the overrides")
    if not cfg.stage2.enabled:
        raise UserError(f"{src}: stage2.enabled=false leaves nothing to train")
    if out is None or Path(out).resolve() == src.resolve():
        if last.stage2 is not None and not force:
            raise UserError(f"{src}: has a second stage already; pass --force to replace it, or -o for a new run folder")
        _train_stage2_again(src, src, cfg, overrides, last.config, log, progress)
        return src
    dst = Path(out)
    with staged_dir(dst, force) as tmp:  # NEW appears only with its second stage trained
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        cfg = replace(cfg, train=replace(cfg.train, out=str(dst)))  # a later --resume finds the copy, not the run
        _train_stage2_again(tmp, src, cfg, overrides, last.config, log, progress)
    return dst


def _train_stage2_again(folder: Path, src: Path, cfg: Config, overrides: list[str], before: Config, log,
                        progress) -> None:
    """``retrain_stage2``'s work in the run ``folder`` (``src`` or its copy): ``cfg`` into its
    checkpoints and config.yaml, the proposer dropped (and trained again) when its settings differ
    from ``before`` (the run's config), the mined candidates dropped when the pool's settings
    differ, the change in meta.json, then the proposer and stage two trained."""
    run = RunFolder(folder, resume=True)
    proposer = checkpoint.load(run.last).proposer
    if cfg.proposer != before.proposer or not cfg.proposer.enabled:
        proposer = None
    pool = (cfg.stage2.candidates, cfg.stage2.blobs, cfg.proposer.enabled, cfg.proposer.candidates)
    if proposer is None or pool != (before.stage2.candidates, before.stage2.blobs, before.proposer.enabled,
                                    before.proposer.candidates):
        (folder / "stage2_candidates.json").unlink(missing_ok=True)  # stage two's pool changed: mine again
    run.update(proposer=proposer, stage2=None, operating_points=None, config=cfg)  # nothing after stage one until trained
    write_text(folder / "config.yaml", config_yaml(cfg))
    meta = read_meta(folder)
    meta["stage2_retrained"] = {"from": str(src), "overrides": list(overrides), "git": git_hash(),
                                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_meta(folder, meta)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    train_after_stage_one(cfg, run, open_cache(cfg), run.splits(), resolve_device(cfg.train.device), log, progress)
