"""glibc's default malloc thresholds against the CLI's (``noduledet.allocator``), on training work.

    python benchmarks/bench_malloc.py [--rounds 3] [--samples 1024] [--steps 20]

The thresholds are a property of the process, so each round runs the same work in two fresh
child processes, one as glibc starts and one after ``keep_freed_memory()``, alternating which
goes first. The work is what the demo spends most of its time on: stage two's training
(``fpr.fit``: augmented 24^3 cubes, the 3D classifier's forward and backward) on ``--samples``
cubes, then stage-one training steps (tiny CCAPM, 8 patches of 128 px). Each child reports its
wall time, user and system CPU time, minor page faults and memory peak; the table gives the
medians and the median of the per-round wall-time ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_training import batch  # noqa: E402
from common import machine_line  # noqa: E402

from noduledet.allocator import keep_freed_memory, user_settings  # noqa: E402
from noduledet.config import Config  # noqa: E402
from noduledet.fpr import classifier_spec, cube_margin, fit  # noqa: E402
from noduledet.models import build_detector  # noqa: E402


def work(samples: int, steps: int) -> None:
    """Stage two's training on generated cubes, then stage-one training steps."""
    cfg = Config()
    cfg.stage2.epochs, cfg.stage2.samples_per_epoch = 1, samples
    spec = classifier_spec(cfg)
    side = spec.edge + 2 * cube_margin(cfg.stage2, spec)
    rng = np.random.default_rng(0)
    cubes = rng.normal(-700, 300, (200, side, side, side)).astype(np.int16)
    labels = np.arange(200) % 2
    fit(cubes, labels, cfg, torch.device("cpu"))
    torch.manual_seed(0)
    model = build_detector("ccapm", "tiny").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(steps):
        images, targets = batch(step)
        loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def child(tuned: bool, samples: int, steps: int) -> dict:
    """Run ``work`` in this process (with or without the thresholds) and return its costs."""
    torch.set_num_threads(2)
    applied = keep_freed_memory() if tuned else False
    start, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    work(samples, steps)
    wall, end = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
    return {"tuned": applied, "wall_s": wall, "user_s": end.ru_utime - start.ru_utime,
            "sys_s": end.ru_stime - start.ru_stime, "faults": end.ru_minflt - start.ru_minflt,
            "peak_mb": end.ru_maxrss / 1024}


def spawn(tuned: bool, samples: int, steps: int) -> dict:
    mine = user_settings(os.environ)  # not passed on: glibc's defaults in "before"
    env = {k: v for k, v in os.environ.items() if k not in mine}
    args = [sys.executable, __file__, "--child", "tuned" if tuned else "default", "--samples", str(samples),
            "--steps", str(steps)]
    out = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def bench(rounds: int, samples: int, steps: int) -> dict:
    runs = {False: [], True: []}
    for r in range(rounds):
        for tuned in ((False, True) if r % 2 == 0 else (True, False)):
            runs[tuned].append(spawn(tuned, samples, steps))
    if not all(run["tuned"] for run in runs[True]):
        raise SystemExit("bench_malloc: the thresholds could not be set (not glibc, or NODULEDET_KEEP_FREED_MEMORY=0 "
                         "or GLIBC_TUNABLES malloc settings); nothing to compare")
    medians = {tuned: {k: statistics.median(run[k] for run in runs[tuned]) for k in runs[tuned][0] if k != "tuned"}
               for tuned in runs}
    ratio = statistics.median(a["wall_s"] / b["wall_s"] for a, b in zip(runs[False], runs[True]))
    return {"default": medians[False], "tuned": medians[True], "ratio": ratio}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=1024, help="stage-two training cubes per child")
    ap.add_argument("--steps", type=int, default=20, help="stage-one training steps per child")
    ap.add_argument("--child", choices=["default", "tuned"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child == "tuned", args.samples, args.steps)))
        return 0
    print(machine_line())
    print(f"{args.rounds} rounds; each child, 2 threads: stage two's training on {args.samples} cubes, "
          f"{args.steps} stage-one training steps")
    result = bench(args.rounds, args.samples, args.steps)
    print("| malloc | wall s | user s | system s | minor page faults | memory peak MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in ("default", "tuned"):
        m = result[name]
        print(f"| {name} | {m['wall_s']:.1f} | {m['user_s']:.1f} | {m['sys_s']:.1f} | {m['faults']:,.0f} | "
              f"{m['peak_mb']:.0f} |")
    print(f"wall time default / tuned: {result['ratio']:.2f}x (median of {args.rounds} rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
