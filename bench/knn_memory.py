#!/usr/bin/env python
"""Peak memory of the chunked kNN search on an ImageNet-size bank (1.28M x 128 features).

    python bench/knn_memory.py [--bank 1280000] [--dim 128] [--queries 2000] [--budget-mb 256]

Each measurement runs in a fresh process (peak RSS is per process): first the bank, labels and
queries alone (the baseline), then the same plus `knn_accuracies` (k = 20 and k = 1). Printed:
both peaks, the search's own overhead, its ratio to the bank, and what an unchunked search
(one [queries, bank] similarity matrix) would need. On CUDA (--device cuda) the figures are
torch.cuda.max_memory_allocated instead of RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(args: argparse.Namespace, search: bool) -> dict:
    import torch

    from seed_cluster.knn import auto_chunk_size, knn_accuracies

    g = torch.Generator().manual_seed(0)
    device = torch.device(args.device)
    bank = torch.randn(args.bank, args.dim, generator=g).to(device)
    labels = torch.randint(0, 1000, (args.bank,), generator=g).to(device)
    queries = torch.randn(args.queries, args.dim, generator=g).to(device)
    query_labels = torch.randint(0, 1000, (args.queries,), generator=g).to(device)
    start = time.perf_counter()
    if search:
        knn_accuracies(bank, labels, queries, query_labels, 1000, [20, 1], max_chunk_mb=args.budget_mb)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"peak_mb": peak, "seconds": seconds, "chunk_rows": auto_chunk_size(args.bank, args.budget_mb)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", type=int, default=1_281_167)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--budget-mb", type=float, default=256.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", choices=["baseline", "search"])
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args, args.child == "search")))
        return
    runs = {}
    for child in ("baseline", "search"):
        cmd = [sys.executable, __file__, "--child", child, *sys.argv[1:]]
        runs[child] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    bank_mb = args.bank * args.dim * 4 / 2**20
    overhead = runs["search"]["peak_mb"] - runs["baseline"]["peak_mb"]
    naive_mb = args.queries * args.bank * 4 / 2**20
    print(f"bank {args.bank} x {args.dim} float32 = {bank_mb:.0f} MiB; {args.queries} queries; "
          f"budget {args.budget_mb:.0f} MiB -> {runs['search']['chunk_rows']} query rows per chunk ({args.device})")
    print(f"peak without search {runs['baseline']['peak_mb']:.0f} MiB, with search {runs['search']['peak_mb']:.0f} MiB")
    print(f"search overhead {overhead:.0f} MiB = {overhead / bank_mb:.2f} x the bank "
          f"(unchunked similarity matrix alone: {naive_mb:.0f} MiB = {naive_mb / bank_mb:.1f} x the bank); "
          f"search time {runs['search']['seconds']:.1f} s")


if __name__ == "__main__":
    main()
