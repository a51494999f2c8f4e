#!/usr/bin/env python
"""What the teacher feature cache buys: SEED training steps with the cache vs with the live teacher.

One run on this machine (not a test: it prints figures):

1. Precompute: a ResNet-50 teacher embeds K views of every image of a small Fashion-MNIST
   .beton decoded at 224 px (`mode=precompute`, in this process); prints its images/s.
2. Training: two Trainers of the same config (mobilenetv3_large student, same batch, same
   threads, same data), one with `teacher.cache=on`, one with the live teacher. Their steps
   (next batch + train_step) are timed interleaved, step by step, so the machine's drift
   hits both alike; prints images/s of each and the ratio.

The paper's FLOP ratio bounds the gain: ResNet-50 forward ~4.1 GFLOPs per 224 px image,
MobileNetV3-Large forward+backward ~3 x 0.22 GFLOPs, so the cache can save at most ~7x.

    python bench/teacher_cache.py                      # 224 px, batch 16, 8 timed steps each
    python bench/teacher_cache.py --resolution 128 --steps 20 --threads 2
    python bench/teacher_cache.py --teacher-precision bf16       # fp32 student, bf16 teacher (AVX512-BF16 CPUs)
    python bench/teacher_cache.py --device cuda --precision bf16 --batch 256 --images 4096   # bench/gpu.sh
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per side (after 2 warm-up steps)")
    parser.add_argument("--images", type=int, default=256, help="images in the dataset (and in the cache)")
    parser.add_argument("--views", type=int, default=1, help="cache.views (K)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--student", default="mobilenetv3_large")
    parser.add_argument("--teacher", default="resnet50")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="optim.precision (autocast)")
    parser.add_argument("--teacher-precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="perf.teacher_precision (bf16: the live teacher and the precompute in bf16)")
    args = parser.parse_args()

    import torch

    from ffcv_build import build_fashion_mnist
    from seed_cluster.distributed import DistEnv
    from seed_cluster.launcher import load_config
    from seed_cluster.precompute import precompute
    from seed_cluster.preemption import Preemption
    from seed_cluster.trainer import Trainer

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    build_fashion_mnist(work / "data", limit=args.images)
    device = torch.device(args.device)
    base = ["cluster=local", f"device={args.device}", f"optim.precision={args.precision}",
            f"perf.teacher_precision={args.teacher_precision}", "data=fashion_mnist",
            f"data.train={work / 'data' / 'train.beton'}",
            "data.val=null", f"data.resolution={args.resolution}",
            f"data.batch_size_per_rank={args.batch}", "data.num_workers=1", f"student={args.student}",
            f"teacher={args.teacher}", "method=seed", "method.queue_size=4096", "knn.every_steps=0",
            f"cache.views={args.views}", "cache.dtype=fp16", f"output_dir={work / 'out'}",
            "logging.progress_bar=false", "optim.max_steps=100000"]
    print(f"{args.student} <- {args.teacher} at {args.resolution} px, {args.device} {args.precision} (teacher {args.teacher_precision}), batch {args.batch}, "
          f"{args.threads} threads, "
          f"{args.images} images x {args.views} views", flush=True)

    started = time.perf_counter()
    summary = precompute(load_config([*base, "mode=precompute"]), DistEnv.detect(), Preemption(), device)
    seconds = time.perf_counter() - started
    print(f"precompute: {args.images * args.views} teacher views in {seconds:.1f} s "
          f"({summary['images_per_s'] * args.views:.1f} views/s, including FFCV's pipeline compilation)", flush=True)

    sides = {"live teacher": Trainer(load_config([*base, "teacher.cache=off", f"run_dir={work / 'live'}"]), DistEnv.detect()),
             "cache": Trainer(load_config([*base, "teacher.cache=on", f"run_dir={work / 'cached'}"]), DistEnv.detect())}
    streams = {name: iter(trainer.data) for name, trainer in sides.items()}
    times: dict[str, list[float]] = {name: [] for name in sides}
    for step in range(args.steps + 2):
        for name, trainer in sides.items():
            start = time.perf_counter()
            trainer.train_step(next(streams[name]))
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= 2:  # the first steps compile FFCV's pipeline and warm up allocators
                times[name].append(time.perf_counter() - start)
    rate = {name: args.batch / statistics.median(t) for name, t in times.items()}
    for name, r in rate.items():
        print(f"  {name:>12}: {r:7.1f} images/s (median of {args.steps} steps)")
    print(f"  ratio cache / live teacher: {rate['cache'] / rate['live teacher']:.2f}x")


if __name__ == "__main__":
    main()
