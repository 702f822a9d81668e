"""Training and per-epoch validation (``noduledet train``), single process or under torchrun.

A run directory holds::

    config.yaml    the resolved configuration        meta.json   seed, versions, git hash, device
    splits.json    train / val / test scans          metrics.csv one row per epoch
    last.pt        the latest checkpoint              best.pt     the best validation mAP so far
    tb/            TensorBoard logs

Checkpoints are written to a temporary file and renamed, hold the model, optimiser, scheduler,
gradient scaler, epoch and torch RNG state, and load with ``torch.load(weights_only=True)``.
``--resume`` continues from ``last.pt`` exactly: on the CPU a resumed run ends with the same
weights, bit for bit, as one that was never interrupted (data randomness derives from
(seed, epoch, index) alone; the model's sampling RNG is restored).

Under ``torchrun`` (gloo on the CPU, nccl on GPUs) each process trains on its share of every
epoch (DistributedSampler), validation is sharded and gathered, and rank 0 alone logs and writes.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from noduledet import __version__
from noduledet.config import Config, save_config
from noduledet.data.cache import CacheSettings, SliceCache, cache_ready, prepare
from noduledet.data.dataset import SliceDataset, collate
from noduledet.data.splits import split_scans
from noduledet.errors import UserError
from noduledet.inference import load_checkpoint, resolve_device
from noduledet.metrics.coco import slice_metrics
from noduledet.models.detector import DetectorSpec, build_detector, build_from_spec

CHECKPOINT_FORMAT = 1


# ---- distributed ----------------------------------------------------------------------------

def dist_info() -> tuple[int, int]:
    """(rank, world size): (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> None:
    """Join the process group torchrun set up (WORLD_SIZE > 1); gloo on CPU, nccl on GPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def gather(obj) -> list:
    """Every rank's ``obj``, in rank order (one element outside torchrun)."""
    rank, world = dist_info()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


# ---- pieces ---------------------------------------------------------------------------------

def open_cache(cfg: Config, rank: int = 0) -> SliceCache:
    """The configured cache, prepared from ``data.root`` first when it does not exist yet."""
    if not cfg.data.cache:
        raise UserError("data.cache is not set (the folder of `noduledet prepare`)")
    cache = Path(cfg.data.cache)
    if not cache_ready(cache):
        if not cfg.data.root:
            raise UserError(f"{cache}: no prepared cache, and data.root is not set to prepare one")
        if rank == 0:
            print(f"preparing the cache {cache} from {cfg.data.root}", flush=True)
            prepare(cfg.data.root, cache, CacheSettings())
        if dist_info()[1] > 1:
            dist.barrier()
    return SliceCache(cache)


def make_splits(cfg: Config, cache: SliceCache) -> dict[str, list[str]]:
    d = cfg.data
    subset_of = {u: cache.subset(u) for u in cache.uids}
    splits = split_scans(cache.uids, subset_of, d.test_fraction, d.val_fraction, tuple(d.test_subsets),
                         tuple(d.val_subsets), d.split_seed)
    if not splits["train"]:
        raise UserError(f"no training scans left after the split ({len(cache.uids)} scans in {cache.root})")
    return splits


def make_model(cfg: Config) -> torch.nn.Module:
    options = dict(cfg.model.options)
    options.setdefault("in_channels", len(cfg.data.offsets_mm))
    options.setdefault("masks", cfg.model.masks)
    try:
        return build_detector(cfg.model.variant, cfg.model.preset, **options)
    except ValueError as err:
        raise UserError(f"model: {err}") from None


def make_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW; no weight decay on norms and biases."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr)
    raise UserError(f"train.optimizer={t.optimizer!r}; choose from ['adamw', 'sgd']")


def lr_factor(cfg: Config, step: int, total: int) -> float:
    """Linear warm-up, then cosine to 0 or steps of 0.1 at ``milestones`` (fractions)."""
    t = cfg.train
    warm = min(t.warmup_iters, max(total // 5, 1))
    if step < warm:
        return 0.001 + (1 - 0.001) * step / warm
    if t.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))
    if t.schedule == "step":
        return 0.1 ** sum(step >= m * total for m in t.milestones)
    raise UserError(f"train.schedule={t.schedule!r}; choose from ['cosine', 'step']")


def git_hash() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _to_device(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: v.to(device) for k, v in t.items()} for t in targets]


# ---- validation -----------------------------------------------------------------------------

@torch.inference_mode()
def predict_dataset(model: torch.nn.Module, dataset: SliceDataset, device: torch.device, batch_size: int = 8,
                    progress=None) -> tuple[list[dict], list[dict], list[dict]]:
    """Predictions, targets and infos of this rank's share of ``dataset`` (numpy, CPU)."""
    rank, world = dist_info()
    model.eval()
    indices = list(range(rank, len(dataset), world))
    preds, targets, infos = [], [], []
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    for batch in progress(batches) if progress else batches:
        items = [dataset[i] for i in batch]
        images = [im.to(device) for im, _, _ in items]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            outputs = model(images)
        for (_, t, info), o in zip(items, outputs):
            p = {"boxes": o["boxes"].float().cpu().numpy(), "scores": o["scores"].float().cpu().numpy()}
            if "masks" in o:
                p["masks"] = (o["masks"][:, 0] >= 0.5).cpu().numpy()
            preds.append(p)
            targets.append({k: v.numpy() for k, v in t.items()})
            infos.append(info)
    return preds, targets, infos


def validate(model: torch.nn.Module, dataset: SliceDataset, device: torch.device, cfg: Config) -> dict:
    """Slice metrics over the whole dataset, gathered across ranks."""
    preds, targets, _ = predict_dataset(model, dataset, device, cfg.eval.batch_size)
    parts = gather((preds, targets))
    preds = [p for part in parts for p in part[0]]
    targets = [t for part in parts for t in part[1]]
    return slice_metrics(preds, targets, cfg.train.score_threshold, cfg.eval.iou_threshold)


# ---- training -------------------------------------------------------------------------------

def train(cfg: Config, resume: bool = False, force: bool = False, progress: bool = True) -> dict:
    """Train ``cfg.model`` on ``cfg.data`` for ``cfg.train.epochs`` epochs.

    Returns:
        {"run": run dir, "best": best validation mAP, "history": per-epoch rows}.
    """
    t = cfg.train
    device = resolve_device(t.device)
    init_distributed(device)
    rank, world = dist_info()
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if t.threads:
        torch.set_num_threads(t.threads)
    run = Path(t.out)
    last = run / "last.pt"
    if resume and not last.is_file():
        raise UserError(f"{last}: nothing to resume")
    if not resume and run.exists() and any(run.iterdir()) and not force:
        raise UserError(f"{run}: exists; pass --resume to continue it or --force to overwrite it")
    if world > 1:
        dist.barrier()  # every rank has checked before rank 0 writes
    torch.manual_seed(t.seed)
    cache = open_cache(cfg, rank)
    splits = make_splits(cfg, cache)
    val_uids = splits["val"] or splits["test"]
    d = cfg.data
    common = dict(offsets_mm=d.offsets_mm, window_hu=d.window_hu, masks=cfg.model.masks, min_section=d.min_section,
                  seed=t.seed)
    train_ds = SliceDataset(cache, splits["train"], train=True, patch=d.patch, negatives=d.negatives, **common)
    val_ds = SliceDataset(cache, val_uids, train=False, slices="positive", slice_stride=d.eval_slice_stride, **common)
    if len(train_ds) == 0:
        raise UserError(f"no training slices with nodules in {len(splits['train'])} training scans")
    model = make_model(cfg).to(device)
    if device.type == "cuda" and t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model)
    per_epoch = math.ceil(len(train_ds) / world / t.batch_size)
    total = per_epoch * t.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s, total))
    fp16 = t.amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()
    amp = t.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    start, best, history = 0, -math.inf, []
    if resume:
        ckpt = load_checkpoint(last)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start, best, history = ckpt["epoch"], ckpt["best"], list(ckpt["history"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and ckpt["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    elif rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        for stale in ("last.pt", "best.pt", "metrics.csv"):
            (run / stale).unlink(missing_ok=True)
        shutil.rmtree(run / "tb", ignore_errors=True)  # a forced restart must not mix curves
        save_config(cfg, run / "config.yaml")
        _write_json(run / "splits.json", splits)
        _write_json(run / "meta.json", {
            "noduledet": __version__, "git": git_hash(), "torch": torch.__version__, "seed": t.seed,
            "device": str(device), "world_size": world, "python": platform.python_version(),
            "machine": platform.machine(), "threads": torch.get_num_threads(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(run / "tb")
    spec = model.spec
    for epoch in range(start, t.epochs):
        train_ds.set_epoch(epoch)
        if world > 1:
            sampler = DistributedSampler(train_ds, shuffle=True, seed=t.seed)
            sampler.set_epoch(epoch)
        else:
            sampler = RandomSampler(train_ds, generator=torch.Generator().manual_seed(t.seed * 1000 + epoch))
        loader = DataLoader(train_ds, batch_size=t.batch_size, sampler=sampler, collate_fn=collate,
                            num_workers=t.workers, drop_last=False)
        ddp.train()
        sums: dict[str, float] = {}
        seen, t0 = 0, time.perf_counter()
        bar = None
        if rank == 0 and progress:
            from tqdm import tqdm

            bar = tqdm(total=per_epoch, desc=f"epoch {epoch + 1}/{t.epochs}", unit="batch", leave=True)
        for images, targets, _ in loader:
            images = [im.to(device, non_blocking=True) for im in images]
            targets = _to_device(targets, device)
            with torch.autocast(device.type, dtype=torch.float16 if fp16 else torch.bfloat16, enabled=amp):
                losses = ddp(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise RuntimeError(f"loss is {loss.item()} at epoch {epoch + 1}: lower train.lr or check the data")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if t.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(images)
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) * len(images)
            seen += len(images)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{sums['loss'] / seen:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2g}",
                                img_s=f"{seen * world / (time.perf_counter() - t0):.1f}")
        if bar is not None:
            bar.close()
        totals = gather((sums, seen))
        seen_all = sum(s for _, s in totals)
        row = {"epoch": epoch + 1, "images": seen_all,
               **{k: sum(part[0].get(k, 0.0) for part in totals) / max(seen_all, 1) for k in sums},
               "lr": scheduler.get_last_lr()[0], "train_s": time.perf_counter() - t0,
               "images_per_s": seen_all / (time.perf_counter() - t0)}
        if (epoch + 1) % t.val_every == 0 or epoch + 1 == t.epochs:
            v0 = time.perf_counter()
            m = validate(model, val_ds, device, cfg)
            row.update({f"val_{k}": m[k] for k in ("ap50", "ap", "ap10", "recall", "precision", "f1", "jaccard")},
                       val_s=time.perf_counter() - v0)
        history.append(row)
        score = row.get("val_ap50", float("nan"))
        score = score if math.isfinite(score) else -math.inf  # no validation nodules: no score
        improved = score > best or not (run / "best.pt").exists()
        if improved:
            best = max(best, score)
        if rank == 0:
            ckpt = {
                "format": CHECKPOINT_FORMAT, "noduledet": __version__, "variant": model.variant,
                "spec": spec.to_dict(), "config": cfg.to_dict(), "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "epoch": epoch + 1, "best": best, "history": history,
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []},
            }
            save_atomic(ckpt, last)
            if improved:
                save_atomic({k: ckpt[k] for k in ("format", "noduledet", "variant", "spec", "config", "model",
                                                  "epoch", "best", "history")}, run / "best.pt")
            _write_metrics_csv(run / "metrics.csv", history)
            for k, v in row.items():
                if k != "epoch" and isinstance(v, float) and math.isfinite(v):
                    writer.add_scalar(k, v, epoch + 1)
            writer.flush()
            if progress:
                msg = f"epoch {epoch + 1}: loss {row['loss']:.3f}"
                if "val_ap50" in row:
                    msg += (f", val mAP {row['val_ap50']:.3f}, recall {row['val_recall']:.3f}, "
                            f"F1 {row['val_f1']:.3f} ({row['val_s']:.0f} s)")
                print(msg, flush=True)
    if writer is not None:
        writer.close()
    if world > 1:
        dist.barrier()
    return {"run": str(run), "best": best, "history": history}


def _write_metrics_csv(path: Path, history: list[dict]) -> None:
    keys = []
    for row in history:
        keys += [k for k in row if k not in keys]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for row in history:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    os.replace(tmp, path)


def model_from_checkpoint(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """The trained model (eval mode) and the checkpoint's contents."""
    ckpt = load_checkpoint(path)
    model = build_from_spec(ckpt["variant"], DetectorSpec.from_dict(ckpt["spec"]))
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt
