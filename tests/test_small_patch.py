"""SEED small-patch method: views it asks for, the loss against a reference, what gets enqueued, an end-to-end run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import run_launcher

from seed_cluster.checkpoint import Checkpointer, load
from seed_cluster.config import DataConfig, MethodConfig, StudentConfig, TeacherConfig, TrainConfig
from seed_cluster.data import ViewSpec
from seed_cluster.errors import ConfigError
from seed_cluster.methods import build_method
from seed_cluster.methods.small_patch import SEEDSmallPatch, small_crop_size
from seed_cluster.models import Encoder, build_student
from seed_cluster.teachers import FrozenTeacher

DIM, QUEUE, B = 16, 40, 5


def make_method(resolution: int = 32, **method) -> SEEDSmallPatch:
    torch.manual_seed(0)
    cfg = MethodConfig(name="seed_small_patch", dim=DIM, queue_size=QUEUE, **method)
    teacher = FrozenTeacher(Encoder("convnet_s", DIM, head="mlp", hidden_dim=32, key="teacher.arch"), "test")
    return SEEDSmallPatch(build_student("convnet_s", DIM), teacher, cfg, resolution=resolution)


def make_views(method: SEEDSmallPatch, batch: int = B) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 3, spec.size, spec.size, generator=g) for spec in method.num_views]


def test_build_method_asks_for_one_global_and_six_small_views_scaled_to_the_resolution():
    cfg = TrainConfig(student=StudentConfig(arch="convnet_s"), teacher=TeacherConfig(arch="convnet_s"),
                      method=MethodConfig(name="seed_small_patch", dim=DIM, queue_size=QUEUE),
                      data=DataConfig(train="unused.beton", resolution=32))
    method = build_method(cfg)
    assert isinstance(method, SEEDSmallPatch)
    assert method.num_views == (ViewSpec("swav_global", 32),) + (ViewSpec("swav_small", 14),) * 6
    assert method.view_specs is method.num_views
    assert small_crop_size(MethodConfig(), 224) == 96  # the paper's sizes
    assert small_crop_size(MethodConfig(small_crop_size=20), 32) == 20
    assert make_method(num_small_crops=2, small_crop_size=8).num_views[1:] == (ViewSpec("swav_small", 8),) * 2


def test_unknown_recipe_or_bad_crop_settings_are_config_errors_naming_the_key():
    with pytest.raises(ConfigError, match="method.small_recipe='nope'.*swav_small"):
        MethodConfig(name="seed_small_patch", small_recipe="nope")
    with pytest.raises(ConfigError, match="method.num_small_crops=0.*method.small_crop_size=-1"):
        MethodConfig(name="seed_small_patch", num_small_crops=0, small_crop_size=-1)


def test_keys_are_the_teacher_embeddings_of_the_global_view_and_of_the_first_small_crop():
    method = make_method()
    views = make_views(method)
    out = method.compute(views, method.student)
    assert out.loss.shape == () and out.loss.requires_grad
    assert out.keys.shape == (2, B, DIM)
    assert torch.equal(out.keys[0], method.teacher(views[0]))
    # The teacher runs the small crops as one batch; BN is frozen, so per-crop results match to rounding.
    torch.testing.assert_close(out.keys[1], method.teacher(views[1]))
    assert not torch.allclose(out.keys[1], method.teacher(views[2]))

    method.enqueue(out.keys)
    assert torch.equal(method.queue.embeddings[:B], out.keys[0])
    assert torch.equal(method.small_queue.embeddings[:B], out.keys[1])
    assert method.queue.ptr.item() == method.small_queue.ptr.item() == B
    assert method.small_queue.filled.item() == B  # one row per image, not one per small crop


def reference_ce(student: torch.Tensor, teacher: torch.Tensor, queue: torch.Tensor, tau_s: float, tau_t: float):
    """The official small_patch_builder.py + soft cross-entropy, written out with [N, K + 1] logits."""
    logit_s = torch.cat([(student * teacher).sum(1, keepdim=True), student @ queue.T], dim=1) / tau_s
    logit_t = torch.cat([(teacher * teacher).sum(1, keepdim=True), teacher @ queue.T], dim=1) / tau_t
    return -(F.softmax(logit_t, dim=1) * F.log_softmax(logit_s, dim=1)).sum(1).mean()


def test_loss_is_ce_of_the_global_view_plus_ce_over_all_small_crops_against_the_small_queue():
    method = make_method(num_small_crops=3, tau_t=0.05)  # a soft target, so the queue columns matter
    method.queue.queue.copy_(F.normalize(torch.randn(QUEUE, DIM), dim=1))
    method.small_queue.queue.copy_(F.normalize(torch.randn(QUEUE, DIM), dim=1))
    views = make_views(method)
    out = method.compute(views, method.student, with_stats=True)

    small = torch.cat(views[1:])
    s, s_small = method.student(views[0]), method.student(small)
    t, t_small = method.teacher(views[0]), method.teacher(small)
    assert s_small.shape == (3 * B, DIM)
    expected_global = reference_ce(s, t, method.queue.embeddings, 0.2, 0.05)
    expected_small = reference_ce(s_small, t_small, method.small_queue.embeddings, 0.2, 0.05)
    torch.testing.assert_close(out.loss, expected_global + expected_small, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.stats["loss_global"], expected_global, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.stats["loss_small"], expected_small, rtol=1e-5, atol=1e-5)
    assert {"entropy_student", "small_entropy_student", "small_agreement_top1"} <= set(out.stats)


def test_gradient_reaches_the_student_only():
    method = make_method()
    method.compute(make_views(method), method.student).loss.backward()
    assert all(p.grad is not None for p in method.student.parameters())
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())


def test_state_dict_holds_both_queues_and_no_teacher_and_round_trips():
    method = make_method()
    method.enqueue(method.compute(make_views(method), method.student).keys)
    state = method.state_dict()
    assert {"queue.queue", "small_queue.queue", "small_queue.ptr"} <= set(state)
    assert not any(k.startswith("teacher.") for k in state)
    other = make_method()
    other.load_state_dict(state)
    assert torch.equal(other.small_queue.embeddings, method.small_queue.embeddings)
    assert other.small_queue.ptr.item() == B


@pytest.mark.slow
def test_two_rank_small_patch_run_through_the_launcher_fills_both_queues(fmnist_small, tmp_path):
    result = run_launcher(
        "cluster=local", "cluster.cpus_per_task=1", "cluster.tasks_per_node=2", "data=fashion_mnist",
        f"data.train={fmnist_small / 'train.beton'}", f"data.val={fmnist_small / 'test.beton'}",
        "data.batch_size_per_rank=16", "data.num_workers=1", "student=convnet_s", "teacher=convnet_s",
        "teacher.hidden_dim=32", "method=seed_small_patch", "method.dim=16", "method.queue_size=100",
        "optim.max_steps=3", "checkpoint.every_steps=3", "logging.every_steps=3", f"output_dir={tmp_path}",
        "logging.progress_bar=false")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    state = load(Checkpointer(run / "checkpoints").paths()[-1])
    # 3 steps x 2 ranks x 16 images: one global and one small-crop row per image in each queue.
    assert state["model"]["queue.ptr"].item() == state["model"]["small_queue.ptr"].item() == 96
    assert state["config"]["method"]["name"] == "seed_small_patch"
