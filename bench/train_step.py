#!/usr/bin/env python
"""Images/s of a full SEED training step: this project's TrainStep vs the straightforward step, in one run.

    python bench/train_step.py [--students mobilenetv3_large_100 efficientnet_b0 resnet18] [--teacher resnet50]
                               [--resolutions 96 224] [--batch 32] [--iters 3] [--device cpu] [--precision fp32]
                               [--teacher-precision bf16]

For each student and resolution both steps start from the same weights (student, frozen teacher, a
65536-entry queue) and run on the same random images, alternately (fast, straightforward, straightforward,
fast, ...), so that load from other processes hits both alike; the median time per step of each is
reported as images/s with their ratio. The straightforward step is bench/reference_step.py: fp32 teacher
under no_grad with its BatchNorms, NCHW, queue cloned and [N, K + 1] logits concatenated every step, SGD one
tensor at a time. The teacher has random weights (its cost does not depend on their values).

GPU extras (bench/gpu.sh): --mfu adds model FLOPs per image (teacher forward + student forward and
backward, counted by torch.utils.flop_counter) and the utilisation against a measured bf16 matmul peak;
peak memory and the largest batch for an 80 GB card are printed on CUDA. --results FILE appends the
lines to a Markdown file (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_step import ReferenceStep  # noqa: E402

from seed_cluster.config import MethodConfig, OptimConfig, PerfConfig  # noqa: E402
from seed_cluster.methods.seed import SEED  # noqa: E402
from seed_cluster.models import Encoder  # noqa: E402
from seed_cluster.step import TrainStep  # noqa: E402
from seed_cluster.teachers import FrozenTeacher  # noqa: E402

# Teacher heads as released (DESIGN.md section 3): MoCo-v2's MLP for ResNet-50, SwAV's Linear-BN-ReLU-Linear
# with an 8192 hidden layer for the wide ResNet-50 x2.
TEACHER_HEADS = {"swav_resnet50w2": ("mlp_bn", 8192), "swav_resnet50": ("mlp_bn", 2048)}
LR, QUEUE, DIM = 0.03, 65536, 128
CARD_BYTES = 80e9


def build(args: argparse.Namespace, student_arch: str, device: torch.device):
    torch.manual_seed(0)
    student = Encoder(student_arch, DIM).to(device)
    head, hidden = TEACHER_HEADS.get(args.teacher, ("mlp", 0))
    teacher = Encoder(args.teacher, DIM, head=head, hidden_dim=hidden, key="teacher.arch").to(device).eval()
    bf16 = args.precision == "bf16"
    perf = PerfConfig(channels_last=not args.no_channels_last, teacher_precision=args.teacher_precision,
                      compile=args.compile)
    method = SEED(copy.deepcopy(student), FrozenTeacher(copy.deepcopy(teacher), fingerprint="bench"),
                  MethodConfig(queue_size=args.queue, dim=DIM)).to(device)
    fast = TrainStep(method, OptimConfig(), perf, device, lr=LR, bf16=bf16)
    slow = ReferenceStep(student, teacher, method.queue.embeddings, lr=LR, bf16=bf16)
    return fast, slow


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def peak_memory(fn, device: torch.device) -> float:
    """Peak bytes allocated during one call (CUDA only)."""
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device)


def step_flops(args: argparse.Namespace, student_arch: str, res: int, device: torch.device) -> float:
    """Model FLOPs per image: teacher forward + 3 x student forward (backward = 2 x forward, the usual MFU
    convention; torch's counter over-counts the backward of depthwise convolutions by ~25x, so it is not
    used for the backward). The loss (N x K x 128 x 2 matmuls) is left out."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    head, hidden = TEACHER_HEADS.get(args.teacher, ("mlp", 0))
    teacher = Encoder(args.teacher, DIM, head=head, hidden_dim=hidden, key="teacher.arch").to(device).eval()
    student = Encoder(student_arch, DIM).to(device)
    x = torch.randn(2, 3, res, res, device=device)
    forward = {}
    for name, network in (("teacher", teacher), ("student", student)):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            network(x)
        forward[name] = counter.get_total_flops() / 2
    return forward["teacher"] + 3 * forward["student"]


def bf16_matmul_peak(device: torch.device) -> float:
    """Measured bf16 matmul FLOP/s (8192^3, best of 10): the denominator of the utilisation."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = min(timed(lambda: a @ b, device) for _ in range(10))
    return 2 * 8192 ** 3 / best


def measure(args: argparse.Namespace, student_arch: str, res: int, device: torch.device, batch: int) -> dict:
    fast, slow = build(args, student_arch, device)
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(batch, 3, res, res, generator=g).to(device)
    times = {"fast": [], "slow": []}
    runs = {"fast": lambda: fast([x], None, lr=LR), "slow": lambda: slow(x)}
    for i in range(args.warmup + args.iters):
        order = ("fast", "slow") if i % 2 == 0 else ("slow", "fast")
        for name in order:
            seconds = timed(runs[name], device)
            if i >= args.warmup:
                times[name].append(seconds)
    result = {name: batch / statistics.median(t) for name, t in times.items()}
    if device.type == "cuda":
        result.update({f"{name}_peak_bytes": peak_memory(fn, device) for name, fn in runs.items()})
    return result


def step_peak(args: argparse.Namespace, student_arch: str, res: int, device: torch.device, batch: int,
              name: str) -> float:
    """Peak bytes of one step of `name` (fast or slow) at `batch`, after a first step that allocates the
    optimizer state."""
    fast, slow = build(args, student_arch, device)
    x = torch.randn(batch, 3, res, res, device=device)
    step = (lambda: fast([x], None, lr=LR)) if name == "fast" else (lambda: slow(x))
    step()
    return peak_memory(step, device)


def largest_batch(args: argparse.Namespace, student_arch: str, res: int, device: torch.device) -> dict:
    """Peak memory is affine in the batch (weights + queue + batch x activations): measured at two batch
    sizes, extrapolated to the card. An estimate, not a run at that batch."""
    small, large = args.batch // 2, args.batch
    fits = {}
    for name in ("fast", "slow"):
        peaks = [step_peak(args, student_arch, res, device, batch, name) for batch in (small, large)]
        torch.cuda.empty_cache()
        per_image = (peaks[1] - peaks[0]) / (large - small)
        fits[name] = int((CARD_BYTES - (peaks[0] - small * per_image)) / per_image)
    return fits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", nargs="+", default=["mobilenetv3_large_100", "efficientnet_b0", "resnet18"])
    parser.add_argument("--teacher", default="resnet50")
    parser.add_argument("--resolutions", nargs="+", type=int, default=[96, 224])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=3, help="timed steps of each implementation")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--queue", type=int, default=QUEUE)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="student autocast and teacher precision of the fast step (the straightforward "
                             "step's student uses the same autocast; its teacher is always fp32)")
    parser.add_argument("--teacher-precision", choices=["fp32", "bf16"],
                        help="the fast step's teacher only (default: --precision); e.g. bf16 with an fp32 student "
                             "on a CPU with AVX512-BF16 or AMX")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, the same for both")
    parser.add_argument("--mfu", action="store_true", help="model FLOP utilisation against a measured bf16 peak")
    parser.add_argument("--max-batch", action="store_true", help="CUDA: largest batch for an 80 GB card")
    parser.add_argument("--results", type=Path, help="append the lines to this Markdown file")
    args = parser.parse_args()
    args.teacher_precision = args.teacher_precision or args.precision
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    header = (f"{datetime.date.today()} {card}, torch {torch.__version__}: teacher {args.teacher}, batch {args.batch}, "
              f"{args.precision} (fast step's teacher {args.teacher_precision}), queue {args.queue}, median of {args.iters} steps")
    print(header)
    peak = bf16_matmul_peak(device) if args.mfu else None
    if peak:
        print(f"measured bf16 matmul peak: {peak / 1e12:.1f} TFLOP/s")
    lines = []
    for arch in args.students:
        for res in args.resolutions:
            r = measure(args, arch, res, device, args.batch)
            line = (f"{arch:<22} {res:>3}px  fast {r['fast']:8.1f} img/s  straightforward {r['slow']:8.1f} img/s  "
                    f"ratio {r['fast'] / r['slow']:.2f}x")
            if "fast_peak_bytes" in r:
                line += (f"  peak {r['fast_peak_bytes'] / 2**30:.1f} vs {r['slow_peak_bytes'] / 2**30:.1f} GiB "
                         f"({r['fast_peak_bytes'] / args.batch / 2**20:.0f} vs "
                         f"{r['slow_peak_bytes'] / args.batch / 2**20:.0f} MiB/img)")
            if peak:
                flops = step_flops(args, arch, res, device)
                line += f"  {flops / 1e9:.1f} GFLOP/img  MFU {flops * r['fast'] / peak:.1%} vs {flops * r['slow'] / peak:.1%}"
            if args.max_batch and device.type == "cuda":
                fits = largest_batch(args, arch, res, device)
                line += f"  largest batch on 80 GB ~{fits['fast']} vs ~{fits['slow']} (extrapolated)"
            print(line, flush=True)
            lines.append(line)
    if args.results:
        with args.results.open("a") as f:
            f.write(f"\n{header}\n\n" + "".join(f"    {line}\n" for line in lines))


if __name__ == "__main__":
    main()
