"""The fast training step (seed_cluster.step) computes what the straightforward step computes.

The straightforward step is bench/reference_step.py (what the benchmark measures against). No timing here:
speed is bench/train_step.py's business; these tests pin down that the speed costs nothing but rounding.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from seed_cluster.config import MethodConfig, OptimConfig, PerfConfig, config_hash
from seed_cluster.errors import ConfigError
from seed_cluster.launcher import load_config
from seed_cluster.methods.seed import SEED
from seed_cluster.models import Encoder, fold_batchnorm
from seed_cluster.step import TrainStep
from seed_cluster.teachers import FrozenTeacher

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("reference_step", ROOT / "bench" / "reference_step.py")
reference_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference_step)

BATCH, RES, QUEUE, DIM, LR = 8, 16, 64, 16, 0.03
# A randomly initialised teacher maps every random image to nearly the same embedding (cosine ~0.99999), so
# once the queue holds the previous batch's embeddings the target at the paper's tau_t = 1e-4 amplifies
# 1e-7 rounding differences (BN folded or not, NCHW or NHWC) by 1e4: ill-conditioned for any two
# implementations. Steps after the first are therefore compared at a temperature where the target is a
# smooth function of the embeddings; the first step (random queue, well separated) at tau_t = 1e-4.
TAU_T_MULTI_STEP = 0.05


def randomise_batchnorm(network: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine weights away from their identity initialisation, so a wrong fold shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in network.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return network


def models(student_arch: str = "convnet_s", teacher_arch: str = "convnet_s") -> tuple[Encoder, Encoder]:
    torch.manual_seed(0)
    student = Encoder(student_arch, DIM)
    teacher = randomise_batchnorm(Encoder(teacher_arch, DIM, key="teacher.arch")).eval()
    return student, teacher


def images(step: int, res: int = RES) -> torch.Tensor:
    return torch.randn(BATCH, 3, res, res, generator=torch.Generator().manual_seed(100 + step))


def fast_step(student: Encoder, teacher: Encoder, perf: PerfConfig, bf16: bool = False, cached: bool = False,
              tau_t: float = 1e-4) -> TrainStep:
    frozen = None if cached else FrozenTeacher(copy.deepcopy(teacher), fingerprint="test")
    torch.manual_seed(1)  # the queue's random initial rows: the same in every step built here
    method = SEED(copy.deepcopy(student), frozen, MethodConfig(queue_size=QUEUE, dim=DIM, tau_t=tau_t))
    return TrainStep(method, OptimConfig(), perf, torch.device("cpu"), lr=LR, bf16=bf16)


def slow_step(student: Encoder, teacher: Encoder, queue: torch.Tensor, tau_t: float = 1e-4):
    return reference_step.ReferenceStep(copy.deepcopy(student), copy.deepcopy(teacher), queue, lr=LR, tau_t=tau_t)


def assert_steps_agree(fast: TrainStep, slow, teacher: Encoder, steps: int, rtol: float, cached: bool = False,
                       res: int = RES):
    """Loss, every gradient, the updated weights and the queue, step after step (the queue of step 2 holds
    step 1's teacher embeddings, so enqueueing is compared too). Gradients and weights are compared per
    tensor, to `rtol` of the tensor's largest entry (entries near 0 have no meaningful relative error)."""
    for step in range(steps):
        x = images(step, res)
        targets = None
        if cached:
            with torch.no_grad():
                targets = [teacher(x)]
        out = fast([x], targets, lr=LR)
        loss = slow(x)
        torch.testing.assert_close(out.loss.detach(), loss, rtol=rtol, atol=0)
        for (name, a), b in zip(fast.method.student.named_parameters(), slow.student.parameters(), strict=True):
            for what, u, v in (("grad", a.grad, b.grad), ("weight", a.detach(), b.detach())):
                scale = v.abs().max().item()
                torch.testing.assert_close(u, v, rtol=rtol, atol=rtol * scale, msg=f"{what} of {name}, step {step}")
        # The project's queue is a ring at `ptr`; the reference's a plain buffer written at the same rows.
        torch.testing.assert_close(fast.method.queue.embeddings, slow.queue, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("channels_last", [True, False])
def test_fast_step_equals_the_straightforward_step_in_fp32(channels_last):
    student, teacher = models()
    fast = fast_step(student, teacher, PerfConfig(channels_last=channels_last), tau_t=TAU_T_MULTI_STEP)
    slow = slow_step(student, teacher, fast.method.queue.embeddings, tau_t=TAU_T_MULTI_STEP)
    assert_steps_agree(fast, slow, teacher, steps=2, rtol=1e-5)


def test_fast_step_equals_the_straightforward_step_in_fp32_at_the_papers_tau_t():
    student, teacher = models()
    fast = fast_step(student, teacher, PerfConfig())
    assert_steps_agree(fast, slow_step(student, teacher, fast.method.queue.embeddings), teacher, steps=1, rtol=1e-5)


def test_fast_step_equals_the_straightforward_step_for_a_timm_student():
    """One step: from the second step on, this randomly initialised ResNet's gradients move by ~2e-5 (NCHW)
    to ~5e-3 (NHWC) relative under 1e-7 changes of its weights, which any two implementations make."""
    student, teacher = models("resnet10t", "convnet_s")
    fast = fast_step(student, teacher, PerfConfig())
    slow = slow_step(student, teacher, fast.method.queue.embeddings)
    assert_steps_agree(fast, slow, teacher, steps=1, rtol=1e-5)


def test_fast_step_from_cached_teacher_embeddings_equals_the_straightforward_step():
    """With the feature cache the method has no teacher: the step takes the batch's `targets`."""
    student, teacher = models()
    fast = fast_step(student, teacher, PerfConfig(), cached=True, tau_t=TAU_T_MULTI_STEP)
    assert fast.method.teacher is None
    slow = slow_step(student, teacher, fast.method.queue.embeddings, tau_t=TAU_T_MULTI_STEP)
    assert_steps_agree(fast, slow, teacher, steps=2, rtol=1e-5, cached=True)


def test_bf16_step_loss_stays_within_1e_2_of_the_fp32_reference_at_tau_t_1e_4():
    """bf16 autocast student and bf16 teacher against the fp32 straightforward step, from the same weights:
    the loss is finite and within 1e-2 relative (measured: ~1e-3). At tau_t = 1e-4 a bf16 teacher
    similarity (8-bit mantissa, error ~4e-3) would be off by ~40 as a logit; the step scores the teacher's
    L2-normalised embeddings against the queue in fp32, which is what keeps this close."""
    student, teacher = models()
    fast = fast_step(student, teacher, PerfConfig(teacher_precision="bf16"), bf16=True)
    slow = slow_step(student, teacher, fast.method.queue.embeddings)
    x = images(0)
    out = fast([x], None, lr=LR)
    loss = slow(x)
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss.detach(), loss, rtol=1e-2, atol=0)


def test_bf16_teacher_with_an_fp32_student_stays_within_2_percent_of_the_fp32_step_at_tau_t_1e_4():
    """perf.teacher_precision=bf16 with an fp32 student (the CPU option: oneDNN runs the teacher's dense
    convolutions ~2x faster in bf16 on AVX512-BF16): one step against the fp32 straightforward step, loss
    within 1e-3 and each gradient within 2% of its norm (measured: 1.9e-4 and 0.6%)."""
    student, teacher = models()
    fast = fast_step(student, teacher, PerfConfig(teacher_precision="bf16"))
    slow = slow_step(student, teacher, fast.method.queue.embeddings)
    x = images(0)
    out = fast([x], None, lr=LR)
    torch.testing.assert_close(out.loss.detach(), slow(x), rtol=1e-3, atol=0)
    for (name, a), b in zip(fast.method.student.named_parameters(), slow.student.parameters(), strict=True):
        assert (a.grad - b.grad).norm() <= 0.02 * b.grad.norm(), name


def test_bf16_teacher_and_loss_add_at_most_5_percent_to_the_students_own_bf16_gradient_error():
    """Gradients of the fast step in bf16 (bf16 teacher, fast loss) against the straightforward step with the
    same bf16 autocast student (fp32 teacher, concatenated fp32 logits), both NCHW: each tensor within 5%
    of its norm (measured: ~1.4%). Against an fp32 student the tiny test network's backbone gradients differ
    by ~30% under bf16 whichever step runs it (bf16 backward through BN over 8 images), and NHWC bf16
    kernels round differently from NCHW ones: those are the student's precision, not the step's."""
    student, teacher = models()
    fast = fast_step(student, teacher, PerfConfig(teacher_precision="bf16", channels_last=False), bf16=True)
    slow = reference_step.ReferenceStep(copy.deepcopy(student), copy.deepcopy(teacher),
                                        fast.method.queue.embeddings, lr=LR, bf16=True)
    x = images(0)
    fast([x], None, lr=LR)
    slow(x)
    for (name, a), b in zip(fast.method.student.named_parameters(), slow.student.parameters(), strict=True):
        assert (a.grad.float() - b.grad.float()).norm() <= 0.05 * b.grad.float().norm(), name


@pytest.mark.slow
def test_compile_on_and_off_compute_the_same_steps():
    student, teacher = models()
    plain = fast_step(student, teacher, PerfConfig(compile=False))
    compiled = fast_step(student, teacher, PerfConfig(compile=True))
    for step in range(2):
        x = images(step)
        a, b = plain([x], None, lr=LR), compiled([x], None, lr=LR)
        torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=0)
        for (name, p), q in zip(plain.method.student.named_parameters(), compiled.method.student.parameters(),
                                strict=True):
            scale = p.grad.abs().max().item()
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5 * scale, msg=f"grad of {name}")
    torch.testing.assert_close(compiled.method.queue.embeddings, plain.method.queue.embeddings, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["convnet_s", "resnet18", "swav_resnet50"])
def test_fold_batchnorm_folds_every_conv_bn_pair_and_keeps_the_output(arch):
    torch.manual_seed(0)
    network = randomise_batchnorm(Encoder(arch, DIM, key="teacher.arch").backbone).eval()
    folded = copy.deepcopy(network)
    count = fold_batchnorm(folded)
    assert count == sum(isinstance(m, nn.BatchNorm2d) for m in network.modules()) > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected, got = network(x), folded(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_fold_batchnorm_leaves_a_bn_whose_conv_output_is_used_twice():
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # folding would change the second use of y

    network = randomise_batchnorm(Branch()).eval()
    assert fold_batchnorm(network) == 0 and isinstance(network.bn, nn.BatchNorm2d)


def test_configured_teacher_keeps_its_fingerprint_and_its_embeddings():
    _, encoder = models(teacher_arch="convnet_m")
    plain = FrozenTeacher(copy.deepcopy(encoder), fingerprint="abc")
    fast = FrozenTeacher(copy.deepcopy(encoder), fingerprint="abc").configure(channels_last=True, precision="fp32")
    x = images(0)
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-6)
    assert fast.fingerprint == "abc" and not fast(x).is_inference()


TRAIN = "data.train=/data/train.beton"
# config_hash of `load_config([TRAIN])` with the perf section excluded. Pinned so that no change to the
# config moves existing runs to new directories by accident. It last changed on purpose at 09586c6, when
# the seeded crop decoder removed data.decode_resolution and changed every view: runs made before cannot
# resume bit-exactly, so they start afresh. (Before that it was ce1a1e78.)
HASH_BEFORE_PERF = "d763cd4c"


@pytest.mark.parametrize("override", ["perf.channels_last=false", "perf.teacher_precision=bf16",
                                      "perf.compile=true", "perf.ddp_bucket_mb=5"])
def test_perf_keys_do_not_change_the_run_hash(override):
    assert config_hash(load_config([TRAIN, override])) == config_hash(load_config([TRAIN])) == HASH_BEFORE_PERF


@pytest.mark.parametrize("override, key", [("perf.teacher_precision=fp16", "perf.teacher_precision"),
                                           ("perf.ddp_bucket_mb=0", "perf.ddp_bucket_mb")])
def test_invalid_perf_values_are_one_line_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config([TRAIN, override])


def test_compile_without_a_cpp_compiler_is_refused_before_anything_is_built(monkeypatch):
    import seed_cluster.step as step

    monkeypatch.setattr(step.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="perf.compile=true needs a C"):
        step.check_perf(PerfConfig(compile=True))
    step.check_perf(PerfConfig(compile=False))  # nothing to build: no compiler needed


def test_mocov2_steps_in_channels_last_and_its_key_encoder_follows_the_student():
    from seed_cluster.methods.mocov2 import MoCoV2

    torch.manual_seed(0)
    method = MoCoV2(Encoder("convnet_s", DIM), MethodConfig(name="mocov2", queue_size=QUEUE, dim=DIM, bn_splits=2))
    step = TrainStep(method, OptimConfig(), PerfConfig(channels_last=True), torch.device("cpu"), lr=LR, bf16=False)
    conv = method.key_encoder.backbone.features[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    out = step([images(0), images(1)], None, lr=LR)
    assert torch.isfinite(out.loss) and method.queue.ptr.item() == BATCH
    # The key encoder starts as a copy of the student: it moves on the next step, towards the updated student.
    before, student = conv.detach().clone(), method.student.backbone.features[0].weight.detach().clone()
    step([images(2), images(3)], None, lr=LR)
    torch.testing.assert_close(conv, 0.999 * before + 0.001 * student)
    assert (conv - before).abs().max() > 1e-7
