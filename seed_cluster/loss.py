"""SEED's distillation loss, MoCo-v2's InfoNCE baseline and queue diagnostics.

SEED: Self-supervised Distillation for Visual Representation.
Fang, Wang, Wang, Zhang, Yang, Liu. ICLR 2021. https://arxiv.org/abs/2101.04731
Official code: https://github.com/jacobswan1/SEED

Both losses score a batch against a queue of teacher (SEED) or key (MoCo) embeddings
over the ``K + 1`` candidates ``[positive, queue_0, ..., queue_{K-1}]``. The positive
column and the queue block are computed separately, so the ``[N, K + 1]``
concatenation of the textbook definition is never materialised and the queue is never
copied. ``seed_loss`` has its own backward (`_SEEDLoss`: one matmul per branch against
the queue, softmaxes computed in place). The results equal the textbook definition;
``tests/test_loss.py`` checks this in float64.

Precision: every softmax / log-softmax runs in float32. ``seed_loss`` runs entirely in
float32 (autocast disabled): its matmuls are small next to the networks, and at
``tau_t = 1e-4`` a bf16 rounding error of ~4e-3 in a similarity becomes ~40 in a logit.
``infonce_loss`` under ``torch.autocast(..., dtype=torch.bfloat16)`` runs its matmul in
bf16 and casts the logits to float32 before dividing by ``tau``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["seed_loss", "infonce_loss", "queue_stats"]


def _split_logits(
    x: torch.Tensor, positive: torch.Tensor, queue: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits of ``x`` split into the positive column ``[N]`` and the queue block ``[N, K]``.

    The matmul follows the caller's precision (autocast or the inputs' dtype); only its
    ``[N, K]`` result is cast to float32 before the temperature is applied.
    """
    dtype = torch.promote_types(x.dtype, queue.dtype)
    x = x.to(dtype)
    pos = (x * positive.to(dtype)).sum(dim=1).float() / tau
    neg = (x @ queue.to(dtype).T).float() / tau
    return pos, neg


def _teacher_logits(
    teacher: torch.Tensor, queue: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached float32 teacher logits ``([N], [N, K])``, computed with autocast disabled."""
    with torch.no_grad(), torch.autocast(device_type=teacher.device.type, enabled=False):
        t = teacher.detach().float()
        return _split_logits(t, t, queue.detach().float(), tau)


def _log_normaliser(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """``logsumexp([pos, neg], dim=1)`` without concatenating: ``[N]``."""
    return torch.logaddexp(pos, torch.logsumexp(neg, dim=1))


def seed_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    queue: torch.Tensor,
    tau_s: float = 0.2,
    tau_t: float = 1e-4,
) -> torch.Tensor:
    """SEED loss: cross-entropy between teacher and student similarity distributions.

    SEED (Fang et al., ICLR 2021, arXiv 2101.04731), Eq. 2-4; official code
    ``jacobswan1/SEED``. For each sample ``i`` with student embedding ``s_i`` and teacher
    embedding ``t_i`` (both L2-normalised) and the queue of teacher embeddings ``d_j``::

        p_T(i) = softmax([t_i . t_i, t_i . d_1, ..., t_i . d_K] / tau_t)
        p_S(i) = softmax([s_i . t_i, s_i . d_1, ..., s_i . d_K] / tau_s)
        loss   = mean_i  -sum_j p_T(i)_j * log p_S(i)_j

    The teacher target is detached: gradient flows to ``student`` only. The queue must
    hold the embeddings enqueued *before* this batch (enqueue after the loss).

    Args:
        student: ``[N, D]`` L2-normalised student embeddings.
        teacher: ``[N, D]`` L2-normalised teacher embeddings (any grad is ignored).
        queue: ``[K, D]`` L2-normalised teacher embeddings, one per row.
        tau_s: student temperature (paper default 0.2).
        tau_t: teacher temperature (paper default 1e-4: the target is then near one-hot
            on the positive).

    Returns:
        Scalar float32 loss.
    """
    return _SEEDLoss.apply(student, teacher.detach(), queue.detach(), tau_s, tau_t)


class _SEEDLoss(torch.autograd.Function):
    """`seed_loss` with a hand-written backward, in at least float32 whatever autocast says.

    Autograd through the composite formula keeps about six ``[N, K]`` tensors alive and makes about
    fifteen elementwise passes over them (on a CPU this cost more than the concatenating textbook
    version). Here forward makes two ``[N, K]`` buffers, each written by its matmul and then updated
    in place (scale, shift, exp, normalise): the teacher target ``p`` and the student softmax ``q``.
    With ``P = sum_j p_j`` (1 up to rounding) the gradient is
    ``d loss / d logit_j = (P q_j - p_j) / N`` for every column, so backward is one more pass and one
    matmul against the queue. The matmuls run in float32 (or the inputs' wider type): they are small
    next to the networks, and bf16 similarities would be off by ~40 logit units at ``tau_t = 1e-4``.
    """

    @staticmethod
    def forward(ctx, student, teacher, queue, tau_s, tau_t):
        dtype = torch.promote_types(student.dtype, torch.float32)
        with torch.autocast(device_type=student.device.type, enabled=False):
            s, t, q = student.to(dtype), teacher.to(dtype), queue.to(dtype)
            # The temperatures scale the [N, D] operands, not the [N, K] products: one pass less each.
            t_tau, s_tau = t / tau_t, s / tau_s
            p_pos, p_neg = _softmax_split((t_tau * t).sum(dim=1), torch.mm(t_tau, q.T))
            s_pos = (s_tau * t).sum(dim=1)
            s_neg = torch.mm(s_tau, q.T)
            # sum_j p_j * logit_j, before s_neg is overwritten by the student softmax
            target_logit = p_pos * s_pos + torch.bmm(p_neg.unsqueeze(1), s_neg.unsqueeze(2)).view(-1)
            q_pos, q_neg, lse = _softmax_split(s_pos, s_neg, with_lse=True)
            p_sum = p_pos + p_neg.sum(dim=1)
            loss = -(target_logit - lse * p_sum).mean()
        ctx.save_for_backward(t, q, p_pos, p_neg, q_pos, q_neg, p_sum)
        ctx.tau_s, ctx.in_dtype = tau_s, student.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        t, q, p_pos, p_neg, q_pos, q_neg, p_sum = ctx.saved_tensors
        scale = grad_loss.to(t.dtype) / (ctx.tau_s * t.shape[0])
        with torch.autocast(device_type=t.device.type, enabled=False):
            grad_neg = q_neg.mul_(p_sum[:, None]).sub_(p_neg)  # in place: q_neg is not used again
            grad_pos = q_pos * p_sum - p_pos
            grad_student = torch.mm(grad_neg, q).add_(grad_pos[:, None] * t).mul_(scale)
        return grad_student.to(ctx.in_dtype), None, None, None, None


def _softmax_split(pos: torch.Tensor, neg: torch.Tensor, with_lse: bool = False):
    """softmax([pos, neg]) as (``[N]``, ``[N, K]``), overwriting `neg` with its part; and logsumexp if asked."""
    top = torch.maximum(pos, neg.amax(dim=1))
    e_pos = torch.exp(pos - top)
    e_neg = neg.sub_(top[:, None]).exp_()
    total = e_pos + e_neg.sum(dim=1)
    e_neg.div_(total[:, None])
    if with_lse:
        return e_pos / total, e_neg, top + torch.log(total)
    return e_pos / total, e_neg


def infonce_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float = 0.2) -> torch.Tensor:
    """MoCo-v2 InfoNCE loss, the paper's baseline (same queue machinery as SEED).

    MoCo (He et al., CVPR 2020, arXiv 1911.05722), Eq. 1; MoCo-v2 (Chen et al., arXiv
    2003.04297). Positive logit ``q_i . k_i``, negatives ``q_i . queue^T``, cross-entropy
    with target 0 over ``[positive, negatives] / tau``.

    Args:
        q: ``[N, D]`` L2-normalised query embeddings (gradient flows here).
        k: ``[N, D]`` L2-normalised key embeddings from the momentum encoder (detached).
        queue: ``[K, D]`` L2-normalised key embeddings, one per row.
        tau: temperature (MoCo-v2 default 0.2).

    Returns:
        Scalar float32 loss.
    """
    pos, neg = _split_logits(q, k.detach(), queue.detach(), tau)
    return (_log_normaliser(pos, neg) - pos).mean()


def _entropy(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy (nats) of ``softmax([pos, neg])``: ``[N]``."""
    lse = _log_normaliser(pos, neg)
    p_pos = torch.exp(pos - lse)
    p_neg = torch.exp(neg - lse[:, None])
    return lse - (p_pos * pos + (p_neg * neg).sum(dim=1))


def _argmax(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """``argmax([pos, neg], dim=1)`` (ties go to the lower index, as torch.argmax): ``[N]``."""
    best_neg, idx = neg.max(dim=1)
    return torch.where(pos >= best_neg, torch.zeros_like(idx), idx + 1)


@torch.no_grad()
def queue_stats(
    student: torch.Tensor,
    teacher: torch.Tensor,
    queue: torch.Tensor,
    tau_s: float = 0.2,
    tau_t: float = 1e-4,
) -> dict[str, torch.Tensor]:
    """Diagnostics of a SEED step, as float32 0-d tensors on the input's device (no host sync).

    Same shapes and conventions as :func:`seed_loss`. Keys:

    - ``entropy_student``: mean entropy (nats) of the student distribution over
      ``[positive, queue]``; at most ``log(K + 1)``.
    - ``entropy_teacher``: the same for the teacher target (near 0 at ``tau_t = 1e-4``).
    - ``agreement_top1``: fraction of samples whose student argmax equals the teacher
      argmax (index 0 is the positive).
    - ``student_std``: per-dimension standard deviation (``correction=0``) of the
      L2-normalised student embeddings, averaged over dimensions; about ``1/sqrt(D)``
      when embeddings are spread on the sphere, near 0 when they collapse.
    """
    t_pos, t_neg = _teacher_logits(teacher, queue, tau_t)
    with torch.autocast(device_type=student.device.type, enabled=False):
        s_pos, s_neg = _split_logits(student.float(), teacher.float(), queue.float(), tau_s)
        s_norm = F.normalize(student.float(), dim=1)
    return {
        "entropy_student": _entropy(s_pos, s_neg).mean(),
        "entropy_teacher": _entropy(t_pos, t_neg).mean(),
        "agreement_top1": (_argmax(s_pos, s_neg) == _argmax(t_pos, t_neg)).float().mean(),
        "student_std": s_norm.std(dim=0, correction=0).mean(),
    }
