"""One row of Table 3 trained at the paper preset on a GPU for a few minutes.

    python benchmarks/bench_table3_gpu.py [--variant ccapm] [--minutes 3] [--neck c4] [--form paper]

Prints images per second, peak GPU memory and the loss curve of noduledet's training step
(build_detector at the paper preset, AdamW without decay on norms and biases, bf16 autocast,
channels_last, gradient clipping at 10, as engine.train) on synthetic 512x512 slices: a noisy
lung-grey background with 0-3 bright round nodules of 2-30 px radius, their boxes the targets,
fresh every step. The loss should fall within the first minute; the images per second and
the peak memory size a full run (LUNA16 train split, epochs) before it is started. With
``--neck c4`` layer4 runs on each of the 512 RoIs per image: lower ``--batch`` if memory runs out.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path


def synthetic_batch(batch: int, size: int, rng, noise, device) -> tuple[list, list[dict]]:
    """``batch`` slices (3, size, size) in [0, 1] with 0-3 round nodules each, and their boxes.

    Nodule counts, radii and centres come from ``rng`` (a ``random.Random``), the pixel noise
    from ``noise`` (a torch generator on ``device``), so drawing them never waits on the GPU.
    """
    import torch

    yy, xx = torch.meshgrid(torch.arange(size, device=device, dtype=torch.float32),
                            torch.arange(size, device=device, dtype=torch.float32), indexing="ij")
    images, targets = [], []
    for _ in range(batch):
        image = 0.15 + 0.05 * torch.randn(3, size, size, generator=noise, device=device)
        boxes = []
        for _ in range(rng.randint(0, 3)):
            r = rng.uniform(2.0, min(30.0, size / 6))
            cx, cy = rng.uniform(r + 1, size - r - 1), rng.uniform(r + 1, size - r - 1)
            image = image + 0.6 * (((xx - cx) ** 2 + (yy - cy) ** 2) <= r * r)
            boxes.append([cx - r, cy - r, cx + r, cy + r])
        images.append(image.clamp(0, 1))
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4).to(device),
                        "labels": torch.ones(len(boxes), dtype=torch.int64, device=device)})
    return images, targets


def train_for(model, device, seconds: float, batch: int, size: int, lr: float = 2e-4, amp: bool = True,
              max_steps: int | None = None, warmup_steps: int = 3) -> dict:
    """Train ``model`` on synthetic slices for ``seconds`` after ``warmup_steps`` untimed steps.

    Returns:
        dict with steps, images, seconds (timed part), images_per_s, losses (one per step,
        warm-up included) and the last step's loss terms.
    """
    import torch

    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 1e-4}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    rng, noise = random.Random(0), torch.Generator(device=device).manual_seed(0)
    model.train()
    losses: list[float] = []

    def step() -> dict:
        images, targets = synthetic_batch(batch, size, rng, noise, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            terms = model(images, targets)
        loss = sum(terms.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        losses.append(float(loss.detach()))  # synchronises: the time includes the whole step
        return {k: float(v.detach()) for k, v in terms.items()}

    for _ in range(warmup_steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, steps, terms = time.perf_counter(), 0, {}
    while time.perf_counter() - start < seconds and (max_steps is None or steps < max_steps):
        terms = step()
        steps += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"steps": steps, "images": steps * batch, "seconds": elapsed,
            "images_per_s": steps * batch / elapsed if elapsed else 0.0, "losses": losses, "last_terms": terms}


def loss_curve(losses: list[float], points: int = 15) -> list[tuple[int, float]]:
    """The losses averaged over ``points`` consecutive windows: (last step of the window, mean)."""
    if not losses:
        return []
    edges = sorted({round(i * len(losses) / points) for i in range(points + 1)})
    return [(b, sum(losses[a:b]) / (b - a)) for a, b in zip(edges, edges[1:]) if b > a]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="ccapm", help="a Table 3 row (default ccapm)")
    p.add_argument("--minutes", type=float, default=3.0, help="timed training, after 3 warm-up steps")
    p.add_argument("--neck", default="c4", choices=["c4", "fpn"],
                   help="c4: Table 3's ResNet carrier without the pyramid (default); fpn: Table 4's model")
    p.add_argument("--form", choices=["hou", "paper"], help="CCAPM/CCASM form (default: the variant's)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--out", type=Path, help="write the numbers and the loss curve as JSON")
    args = p.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("bench_table3_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was run",
              file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).parent))
    from common import machine_line

    from noduledet.models import build_detector
    from noduledet.models.detector import TABLES, count_parameters, describe_variant

    if args.variant not in TABLES[3]:
        print(f"--variant {args.variant!r} is not a Table 3 row: {list(TABLES[3])}", file=sys.stderr)
        return 2
    if args.form and args.variant not in ("ccapm", "ccasm"):
        print(f"--form applies to ccapm and ccasm, not {args.variant!r}", file=sys.stderr)
        return 2
    options = {"neck": args.neck}
    if args.form:
        options["attention_options"] = {"form": args.form}
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    print(f"machine: {machine_line()}")
    print(describe_variant(args.variant, "paper", **options))
    model = build_detector(args.variant, "paper", **options).to(device).to(memory_format=torch.channels_last)
    print(f"parameters: {count_parameters(model) / 1e6:.1f} M; batch {args.batch} x 3x{args.size}x{args.size}, "
          f"bf16 autocast, AdamW lr {args.lr:g}; {args.minutes:g} min timed", flush=True)
    torch.cuda.reset_peak_memory_stats()
    r = train_for(model, device, 60 * args.minutes, args.batch, args.size, args.lr)
    peak, reserved = torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30
    curve = loss_curve(r["losses"])
    print("\n| step | loss (window mean) |\n|---:|---:|")
    for s, v in curve:
        print(f"| {s} | {v:.4f} |")
    print(f"\n{r['steps']} steps, {r['images']} images in {r['seconds']:.0f} s: {r['images_per_s']:.1f} images/s; "
          f"peak memory {peak:.2f} GiB allocated, {reserved:.2f} GiB reserved")
    print("last step: " + ", ".join(f"{k} {v:.4f}" for k, v in r["last_terms"].items()))
    if args.out:
        args.out.write_text(json.dumps({
            "machine": machine_line(), "variant": args.variant, "options": options, "batch": args.batch,
            "size": args.size, "images_per_s": r["images_per_s"], "steps": r["steps"], "seconds": r["seconds"],
            "peak_gib": peak, "reserved_gib": reserved, "losses": r["losses"], "curve": curve}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
