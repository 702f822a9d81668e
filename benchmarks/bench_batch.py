"""predict over a manifest: scans per hour, memory over the run, and two shards gathered.

    python benchmarks/bench_batch.py --checkpoint runs/phantom-ccapm/best.pt [--scans 50] [--size 512]

1. ``--scans`` phantom scans (``noduledet phantom``, LUNA16 resolution) listed in a manifest,
   predicted in one process (the model loaded once): seconds per scan, scans per hour, and the
   resident memory after every scan (it must not grow: one volume and one batch at a time), with
   malloc's thresholds set as the CLI sets them (``noduledet.allocator``).
2. The same manifest as two shards (``--shard 0/2``, ``--shard 1/2``) run one after the other,
   then ``noduledet gather``: the gathered candidates.csv must equal the single run's.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import add_glibc_malloc_option, machine_line, malloc_line  # noqa: E402

from noduledet.batch import gather  # noqa: E402
from noduledet.data.phantom import write_dataset  # noqa: E402
from noduledet.predict import PredictOptions, predict  # noqa: E402


def rss_mb() -> float:
    """This process's resident memory now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run(manifest: Path, checkpoint: Path, out: Path, shard=None) -> tuple[float, list[float]]:
    """Seconds of the run and the memory after each scan."""
    memory: list[float] = []

    def log(line: str) -> None:
        memory.append(rss_mb())

    start = time.perf_counter()
    predict([], checkpoint, out, manifest=manifest, options=PredictOptions(pictures=False, viewer=False),
            shard=shard, log=log)
    return time.perf_counter() - start, memory


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=Path("runs/phantom-ccapm/best.pt"))
    p.add_argument("--scans", type=int, default=50)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--data", type=Path, help="an existing phantom folder (default: generate one)")
    add_glibc_malloc_option(p)
    args = p.parse_args()
    print(f"machine: {machine_line()}\nmodel: {args.checkpoint}\n{malloc_line(args.glibc_malloc)}")  # as predict runs
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = args.data
        if data is None:
            data = tmp / "data"
            t = time.perf_counter()
            write_dataset(data, args.scans, seed=11, size=args.size, workers=2)
            print(f"{args.scans} phantom scans of {args.size} px generated in {time.perf_counter() - t:.0f} s")
        scans = sorted(data.glob("subset*/*.mhd"))
        manifest = tmp / "scans.txt"
        manifest.write_text("".join(f"{s}\n" for s in scans))
        seconds, memory = run(manifest, args.checkpoint, tmp / "one")
        n = len(scans)
        print(f"\n### one process, {n} scans\n")
        print("| scans | seconds | s per scan | scans per hour | RSS after scan 1 | after 10 | max over the run | "
              "mean of the last 10 |\n|---:|---:|---:|---:|---:|---:|---:|---:|")
        print(f"| {n} | {seconds:.0f} | {seconds / n:.1f} | {3600 * n / seconds:.0f} | {memory[0]:.0f} MB | "
              f"{memory[min(9, n - 1)]:.0f} MB | {max(memory):.0f} MB | {sum(memory[-10:]) / len(memory[-10:]):.0f} MB |")
        shard_s = [run(manifest, args.checkpoint, tmp / f"shard{i}", (i, 2))[0] for i in (0, 1)]
        gather([tmp / "shard0", tmp / "shard1"], tmp / "gathered", log=None)
        same = (tmp / "gathered" / "candidates.csv").read_text() == (tmp / "one" / "candidates.csv").read_text()
        print(f"\n### two shards, one after the other, gathered\n\n| shard 0 s | shard 1 s | gathered CSV equals "
              f"the single run's |\n|---:|---:|---|\n| {shard_s[0]:.0f} | {shard_s[1]:.0f} | {'yes' if same else 'NO'} |")
        print(f"\npeak RSS of this process (ru_maxrss): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
