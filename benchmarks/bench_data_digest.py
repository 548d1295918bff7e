"""What the per-rank data digest costs a distributed run (docs/distributed.md, data_split).

Under torch.distributed every rank hashes its pruning data once before round 1
(widetopo.engine.batches.data_digest: blake2b over every input and target), so the ranks can tell
replicated data from per-rank parts. This times that digest over --batches batches of
--batch-size random 3x32x32 float32 images with int64 targets, next to the plain copy of the same
bytes into one contiguous CPU buffer (torch.cat) as a baseline for "one pass over the data";
medians of --reps runs, in the same process.

    python benchmarks/bench_data_digest.py                       # 40 x 256 images (120 MiB)
    python benchmarks/bench_data_digest.py --batches 10 --reps 3
"""
import argparse
import statistics
import time

import torch

from widetopo.engine.batches import data_digest
from widetopo.scores.base import Batch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    batches = [Batch(i, torch.randn(args.batch_size, 3, 32, 32, generator=g),
                     torch.randint(0, 10, (args.batch_size,), generator=g)) for i in range(args.batches)]
    mib = sum(b.x.numel() * b.x.element_size() + b.y.numel() * b.y.element_size() for b in batches) / 2 ** 20

    def timed(fn):
        times = []
        for _ in range(args.reps):
            tic = time.perf_counter()
            fn()
            times.append(time.perf_counter() - tic)
        return statistics.median(times)

    digest = timed(lambda: data_digest(batches))
    copy = timed(lambda: (torch.cat([b.x.reshape(-1) for b in batches]), torch.cat([b.y for b in batches])))
    print(f"data: {args.batches} batches x {args.batch_size} samples, {mib:.1f} MiB")
    print(f"data_digest   {digest:8.3f} s  {mib / digest:8.0f} MiB/s")
    print(f"torch.cat     {copy:8.3f} s  {mib / copy:8.0f} MiB/s  (one copy of the same bytes)")
    print(f"ratio digest / copy: {digest / copy:.1f}")


if __name__ == "__main__":
    main()
