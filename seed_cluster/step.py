"""One training step, set up to run fast: teacher, student forward/backward, optimizer step, enqueue.

`TrainStep` owns how the step runs, `Trainer` owns when (schedule, logging, checkpoints), and the
method (`seed_cluster.methods`) owns what is computed. The choices, measured together by
`bench/train_step.py` against the straightforward step the official code takes (ablations of the
layout in bench/RESULTS.md; on the CPU channels-last is most of the gain):

- the frozen teacher runs under inference mode with its BatchNorms folded into the convolutions,
  in the layout and precision of the `perf` config section (`FrozenTeacher.configure`);
- student, teacher and images in channels-last layout (`perf.channels_last`), which oneDNN and
  cuDNN convolutions prefer;
- the loss scores the batch against the queue with one matmul per branch and its own backward, with
  no clone of the queue and no concatenated ``[N, K + 1]`` logits (`seed_cluster.loss`);
- SGD's fused (or multi-tensor) kernels instead of a Python loop over the parameters;
- under DDP: gradients as views of the buckets, the bucket size from `perf.ddp_bucket_mb`, no
  search for unused parameters, and neither teacher nor queue inside the wrapper or the optimizer;
- optionally torch.compile of student and teacher (`perf.compile`).

None of these changes what the step computes beyond rounding (`tests/test_step_performance.py`).
"""

from __future__ import annotations

import shutil
from typing import Iterable, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .config import OptimConfig, PerfConfig
from .errors import ConfigError
from .methods import StepOutput


def check_perf(perf: PerfConfig) -> None:
    """What `PerfConfig` cannot check by its values alone; run before submission (launcher preflight) and again
    in the job. torch.compile builds kernels with the machine's compiler: inductor's C++ ones on the CPU,
    Triton's launchers (a C compiler) on CUDA."""
    if perf.compile and shutil.which("g++") is None and shutil.which("c++") is None:
        raise ConfigError("perf.compile=true needs a C++ compiler (g++) to build the compiled kernels; install g++ "
                          "(make setup does) or set perf.compile=false")


def build_optimizer(params: Iterable[nn.Parameter], lr: float, optim: OptimConfig) -> torch.optim.SGD:
    """SGD with momentum through its fused kernel where torch has one for the device, else the multi-tensor
    (foreach) one: one kernel per step instead of a Python loop over ~100-200 parameter tensors."""
    params = list(params)
    try:
        return torch.optim.SGD(params, lr=lr, momentum=optim.momentum, weight_decay=optim.weight_decay, fused=True)
    except RuntimeError:  # no fused SGD for this device type in this torch version
        return torch.optim.SGD(params, lr=lr, momentum=optim.momentum, weight_decay=optim.weight_decay,
                               foreach=True)


def wrap_ddp(student: nn.Module, device: torch.device, perf: PerfConfig) -> nn.Module:
    """The student inside DDP: every parameter is used in every step (no unused-parameter search), gradients
    live in the all-reduce buckets (no copy), buckets sized by perf.ddp_bucket_mb."""
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(student, device_ids=device_ids, bucket_cap_mb=perf.ddp_bucket_mb,
                                   find_unused_parameters=False, gradient_as_bucket_view=True)


class TrainStep:
    """Runs one optimisation step of `method` (SEED, its small-patch variant or MoCo-v2).

    Built once: puts the student (and teacher) in the layout and precision of `perf`, wraps the student in
    DDP when `distributed`, and builds the optimizer over the student's parameters only. Call it with the
    batch's views and, when the teacher feature cache feeds the run, the cached teacher embeddings
    (`targets`; the method then has no teacher).
    """

    method: nn.Module
    model: nn.Module
    """The student as the step calls it: inside DDP when distributed, compiled when perf.compile."""
    optimizer: torch.optim.Optimizer

    def __init__(self, method: nn.Module, optim: OptimConfig, perf: PerfConfig, device: torch.device, lr: float,
                 bf16: bool, distributed: bool = False):
        check_perf(perf)
        self.method = method
        self.bf16, self.grad_clip, self.channels_last = bf16, optim.grad_clip, perf.channels_last
        if perf.channels_last:  # before DDP and the optimizer see the parameters
            method.student.to(memory_format=torch.channels_last)
            if getattr(method, "key_encoder", None) is not None:  # MoCo-v2's key encoder sees images too
                method.key_encoder.to(memory_format=torch.channels_last)
        teacher = getattr(method, "teacher", None)
        if teacher is not None:
            teacher.configure(channels_last=perf.channels_last, precision=perf.teacher_precision,
                              compile=perf.compile)
        model = wrap_ddp(method.student, device, perf) if distributed else method.student
        self.model = torch.compile(model) if perf.compile else model
        self.optimizer = build_optimizer(method.student.parameters(), lr, optim)

    def __call__(self, views: list[torch.Tensor], targets: Optional[list[torch.Tensor]], lr: float,
                 with_stats: bool = False) -> StepOutput:
        # 1. This step's learning rate.
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        # 2-4. Teacher (or key, or cached teacher) embeddings, student forward, loss against the queue.
        device_type = views[0].device.type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.method.compute(views, self.model, with_stats=with_stats, targets=targets)
        # 5. Backward, clip, optimizer step.
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if self.grad_clip > 0:
            out.stats["grad/norm"] = nn.utils.clip_grad_norm_(self.method.student.parameters(), self.grad_clip,
                                                              foreach=True)
        self.optimizer.step()
        # 6. Enqueue this step's teacher (key) embeddings, gathered from every rank.
        self.method.enqueue(out.keys)
        return out
