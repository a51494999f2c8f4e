"""SEED loss, InfoNCE and queue diagnostics against straightforward float64 references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from seed_cluster.loss import infonce_loss, queue_stats, seed_loss


def _unit(*shape: int, generator: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=generator, dtype=dtype), dim=-1)


def _reference_seed_loss(s, t, queue, tau_s, tau_t) -> torch.Tensor:
    """The textbook definition in float64: explicit concat, softmax, log."""
    s, t, queue = s.double(), t.double(), queue.double()
    student_logits = torch.cat([(s * t).sum(1, keepdim=True), s @ queue.T], dim=1) / tau_s
    teacher_logits = torch.cat([(t * t).sum(1, keepdim=True), t @ queue.T], dim=1) / tau_t
    target = torch.softmax(teacher_logits, dim=1)
    return -(target * torch.log_softmax(student_logits, dim=1)).sum(1).mean()


TAUS = [(0.2, 1e-4), (0.1, 0.05), (1.0, 1.0)]
SHAPES = [(8, 16, 40), (5, 128, 37), (1, 3, 1), (13, 32, 100)]  # (N, D, K); K not a multiple of N


@pytest.mark.parametrize("tau_s,tau_t", TAUS)
@pytest.mark.parametrize("n,d,k", SHAPES)
def test_seed_loss_equals_float64_reference(tau_s, tau_t, n, d, k):
    g = torch.Generator().manual_seed(n * 1000 + d * 10 + k)
    s, t, queue = _unit(n, d, generator=g), _unit(n, d, generator=g), _unit(k, d, generator=g)
    loss = seed_loss(s, t, queue, tau_s=tau_s, tau_t=tau_t)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    ref = _reference_seed_loss(s, t, queue, tau_s, tau_t)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-4)


def test_seed_loss_matches_reference_when_queue_holds_near_duplicates_of_teacher():
    # At tau_t=1e-4 a queue row almost equal to t splits the target mass: exercises a non-one-hot target.
    g = torch.Generator().manual_seed(0)
    s, t = _unit(6, 32, generator=g), _unit(6, 32, generator=g)
    queue = torch.cat(
        [F.normalize(t + 1e-5 * torch.randn(6, 32, generator=g), dim=1), _unit(20, 32, generator=g)]
    )
    loss = seed_loss(s, t, queue, tau_s=0.2, tau_t=1e-4)
    torch.testing.assert_close(
        loss.double(), _reference_seed_loss(s, t, queue, 0.2, 1e-4), rtol=1e-4, atol=1e-3
    )
    # Under autocast the split target is still computed in fp32 and the loss stays close.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = seed_loss(s, t, queue, tau_s=0.2, tau_t=1e-4)
    assert abs(bf16.item() - loss.item()) < 2e-2


def test_seed_loss_under_bf16_autocast_is_finite_and_close_to_fp32():
    g = torch.Generator().manual_seed(1)
    s, t, queue = _unit(32, 128, generator=g), _unit(32, 128, generator=g), _unit(1000, 128, generator=g)
    fp32 = seed_loss(s, t, queue, tau_s=0.2, tau_t=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = seed_loss(s, t, queue, tau_s=0.2, tau_t=1e-4)
        bf16_inputs = seed_loss(s.bfloat16(), t.bfloat16(), queue, tau_s=0.2, tau_t=1e-4)
    for value in (bf16, bf16_inputs):
        assert value.dtype == torch.float32
        assert torch.isfinite(value)
    # bf16 similarities carry ~2^-9 relative error, i.e. ~0.02 logit units at tau_s=0.2, which
    # mostly averages out in the loss (~log K). Measured on this case (loss 6.84): |diff| 2.4e-5
    # under autocast, 7.1e-5 with bf16 inputs; the bound leaves a wide margin.
    assert abs(bf16.item() - fp32.item()) < 2e-3
    assert abs(bf16_inputs.item() - fp32.item()) < 5e-3


def test_seed_loss_gradient_flows_to_student_only():
    g = torch.Generator().manual_seed(2)
    s = _unit(4, 16, generator=g).requires_grad_()
    t = _unit(4, 16, generator=g).requires_grad_()
    queue = _unit(9, 16, generator=g).requires_grad_()
    seed_loss(s, t, queue, tau_s=0.1, tau_t=0.05).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    assert queue.grad is None


def test_seed_loss_gradient_equals_reference_gradient():
    g = torch.Generator().manual_seed(3)
    s64 = _unit(5, 8, generator=g, dtype=torch.float64)
    t, queue = _unit(5, 8, generator=g), _unit(11, 8, generator=g)
    s = s64.float().requires_grad_()
    seed_loss(s, t, queue, tau_s=0.2, tau_t=0.1).backward()
    s_ref = s64.clone().requires_grad_()
    _reference_seed_loss(s_ref, t, queue, 0.2, 0.1).backward()
    torch.testing.assert_close(s.grad.double(), s_ref.grad, rtol=1e-4, atol=1e-5)


def test_identical_student_and_teacher_with_equal_temperatures_gives_the_target_entropy():
    # Cross-entropy H(p, q) >= H(p) with equality iff q == p: with s == t and tau_s == tau_t the
    # loss is exactly the target's mean entropy, the minimum over students.
    g = torch.Generator().manual_seed(4)
    t, queue = _unit(7, 16, generator=g), _unit(30, 16, generator=g)
    tau = 0.5
    loss = seed_loss(t, t, queue, tau_s=tau, tau_t=tau)
    logits = torch.cat([(t * t).sum(1, keepdim=True), t @ queue.T], dim=1).double() / tau
    p = torch.softmax(logits, 1)
    entropy = -(p * torch.log(p)).sum(1).mean()
    torch.testing.assert_close(loss.double(), entropy, rtol=1e-5, atol=1e-5)
    stats = queue_stats(t, t, queue, tau_s=tau, tau_t=tau)
    torch.testing.assert_close(stats["entropy_student"].double(), entropy, rtol=1e-5, atol=1e-5)
    # Any other student does worse.
    other = _unit(7, 16, generator=g)
    assert seed_loss(other, t, queue, tau_s=tau, tau_t=tau) > loss


def test_seed_loss_with_one_hot_target_is_student_cross_entropy_on_the_positive():
    g = torch.Generator().manual_seed(5)
    s, t, queue = _unit(6, 16, generator=g), _unit(6, 16, generator=g), _unit(25, 16, generator=g)
    loss = seed_loss(s, t, queue, tau_s=0.2, tau_t=1e-4)
    logits = torch.cat([(s * t).sum(1, keepdim=True), s @ queue.T], dim=1) / 0.2
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.zeros(6, dtype=torch.long)))


@pytest.mark.parametrize("tau", [0.2, 0.07, 1.0])
@pytest.mark.parametrize("n,d,k", SHAPES)
def test_infonce_loss_equals_cross_entropy_reference(tau, n, d, k):
    g = torch.Generator().manual_seed(7 + n + k)
    q, key, queue = _unit(n, d, generator=g), _unit(n, d, generator=g), _unit(k, d, generator=g)
    loss = infonce_loss(q, key, queue, tau=tau)
    logits = torch.cat([(q * key).sum(1, keepdim=True), q @ queue.T], dim=1).double() / tau
    ref = F.cross_entropy(logits, torch.zeros(n, dtype=torch.long))
    assert loss.dtype == torch.float32 and loss.ndim == 0
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)


def test_infonce_loss_gradient_flows_to_query_only():
    g = torch.Generator().manual_seed(8)
    q = _unit(4, 8, generator=g).requires_grad_()
    key = _unit(4, 8, generator=g).requires_grad_()
    queue = _unit(10, 8, generator=g).requires_grad_()
    infonce_loss(q, key, queue).backward()
    assert q.grad is not None and key.grad is None and queue.grad is None


def test_infonce_loss_under_bf16_autocast_is_finite_and_fp32():
    g = torch.Generator().manual_seed(9)
    q, key, queue = _unit(16, 64, generator=g), _unit(16, 64, generator=g), _unit(300, 64, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = infonce_loss(q, key, queue)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert abs(loss.item() - infonce_loss(q, key, queue).item()) < 2e-3


def test_queue_stats_student_equal_to_teacher_agrees_everywhere():
    g = torch.Generator().manual_seed(10)
    t, queue = _unit(12, 32, generator=g), _unit(50, 32, generator=g)
    stats = queue_stats(t, t, queue, tau_s=0.2, tau_t=1e-4)
    assert set(stats) == {"entropy_student", "entropy_teacher", "agreement_top1", "student_std"}
    for value in stats.values():
        assert isinstance(value, torch.Tensor) and value.ndim == 0 and value.dtype == torch.float32
    assert stats["agreement_top1"].item() == 1.0
    # One-hot teacher target: entropy ~0; the student at tau_s=0.2 is spread out.
    assert stats["entropy_teacher"].item() < 1e-3
    assert 0 < stats["entropy_student"].item() <= math.log(51) + 1e-5


def test_queue_stats_agreement_counts_samples_whose_student_prefers_a_queue_entry():
    g = torch.Generator().manual_seed(11)
    t, queue = _unit(4, 16, generator=g), _unit(20, 16, generator=g)
    s = t.clone()
    s[:2] = queue[:2]  # samples 0 and 1: the student's argmax is a queue entry, the teacher's the positive
    stats = queue_stats(s, t, queue, tau_s=0.2, tau_t=1e-4)
    assert stats["agreement_top1"].item() == pytest.approx(0.5)


def test_queue_stats_entropy_of_uniform_distribution_is_log_k_plus_one():
    # Student orthogonal to the positive and every queue row: all logits 0, entropy log(K + 1).
    t = torch.zeros(3, 4)
    t[:, 0] = 1.0
    queue = torch.zeros(5, 4)
    queue[:, 1] = 1.0
    s = torch.zeros(3, 4)
    s[:, 2] = 1.0
    stats = queue_stats(s, t, queue, tau_s=0.2, tau_t=1e-4)
    assert stats["entropy_student"].item() == pytest.approx(math.log(6), abs=1e-6)


def test_queue_stats_student_std_detects_collapse():
    g = torch.Generator().manual_seed(12)
    d = 128
    spread = _unit(4096, d, generator=g)
    queue = _unit(10, d, generator=g)
    healthy = queue_stats(spread, spread, queue)["student_std"].item()
    assert healthy == pytest.approx(1 / math.sqrt(d), rel=0.05)
    collapsed = spread[:1].expand(4096, d)
    assert queue_stats(collapsed, spread, queue)["student_std"].item() < 1e-6


def test_queue_stats_do_not_track_gradients():
    g = torch.Generator().manual_seed(13)
    s = _unit(4, 8, generator=g).requires_grad_()
    stats = queue_stats(s, _unit(4, 8, generator=g), _unit(6, 8, generator=g))
    assert all(not v.requires_grad for v in stats.values())
