"""Linear evaluation: protocol pieces, a trained student beats chance, timm students from SEED files, resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import run_launcher
from eval_fixtures import seed_release_file

from seed_cluster.checkpoint import Checkpointer
from seed_cluster.eval_config import LinearConfig, load_eval_config
from seed_cluster.linear import build_classifier, build_head, linear_recipe, lr_at, run_linear


def test_step_schedule_follows_the_protocol_table():
    peak = 30.0 * 512 / 256
    table = {0: peak, 59: peak, 60: peak * 0.1, 79: peak * 0.1, 80: peak * 0.01, 99: peak * 0.01}
    for epoch, expected in table.items():
        assert lr_at(epoch, peak, [60, 80], 0.1) == pytest.approx(expected)


def test_classifier_starts_from_n0_001_with_zero_bias_and_views_are_crop_and_flip_only():
    torch.manual_seed(0)
    fc = build_classifier(2048, 1000, 0.01)
    assert fc.weight.std().item() == pytest.approx(0.01, rel=0.02) and not fc.bias.any()
    recipe = linear_recipe(LinearConfig())
    assert recipe.scale == (0.08, 1.0) and recipe.p_flip == 0.5
    assert recipe.p_jitter == recipe.p_gray == recipe.p_blur == recipe.p_solarize == 0


def test_feature_norm_head_trains_on_batch_statistics_and_evaluates_as_one_affine_map():
    torch.manual_seed(0)
    fc = build_classifier(16, 3, 0.01)
    assert build_head(fc, feature_norm=False) is fc
    head = build_head(fc, feature_norm=True)
    scaled = torch.randn(64, 16) * torch.logspace(-2, 2, 16)  # dimensions 10^4 apart in scale
    head(scaled)  # train mode: normalised by this batch, running statistics updated
    assert not any(p.requires_grad for p in head[0].parameters()), "the normalisation has no trained parameter"
    head.eval()
    a, b = torch.randn(5, 16), torch.randn(5, 16)
    torch.testing.assert_close(head(0.3 * a + 0.7 * b), 0.3 * head(a) + 0.7 * head(b))  # affine in the features


def _overrides(root, out, *extra):
    return [f"run_dir={out}", "device=cpu", "data=fashion_mnist", f"data.train={root / 'train.beton'}",
            f"data.val={root / 'test.beton'}", "data.num_workers=1", "data.batch_size_per_rank=64", *extra]


@pytest.mark.slow
def test_linear_eval_of_a_trained_student_beats_chance_by_far_and_resumes_exactly(fmnist_small, tmp_path):
    result = run_launcher(
        "cluster=local", "cluster.cpus_per_task=1", "data=fashion_mnist", f"data.train={fmnist_small / 'train.beton'}",
        f"data.val={fmnist_small / 'test.beton'}", "data.batch_size_per_rank=64", "data.num_workers=1",
        "student=convnet_s", "method=mocov2", "method.dim=32", "method.queue_size=512", "optim.max_steps=60",
        "optim.base_lr=0.12", "optim.warmup_epochs=0", "optim.precision=bf16", "checkpoint.every_steps=60",
        "logging.progress_bar=false", f"run_dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    common = _overrides(fmnist_small, tmp_path / "lin", f"source.checkpoint={run}", "linear.epochs=3",
                        "linear.milestones=[2]", "linear.base_lr=1.0")
    final = run_linear(load_eval_config(common))
    assert final["epoch"] == 3 and final["top1"] > 45.0, final  # chance is 10%

    history = json.loads((tmp_path / "lin" / "linear_results.json").read_text())["epochs"]
    assert [h["epoch"] for h in history] == [1, 2, 3] and history[2]["lr"] == pytest.approx(0.025)
    results = json.loads((run / "results.json").read_text())
    assert results["linear"]["top1"] == final["top1"] and results["run"]["student"] == "convnet_s"
    assert list((tmp_path / "lin" / "tensorboard").glob("events.out.tfevents.*"))

    # Interrupted after epoch 2 (its last checkpoint lost): resuming as a user would, through the launcher
    # (a local job), gives the same epoch-3 result.
    Checkpointer(tmp_path / "lin" / "checkpoints").paths()[-1].unlink()
    (tmp_path / "lin" / "linear_results.json").unlink()  # so that what is read below was written by the resume
    resumed = run_launcher(*common, "cluster=local", "cluster.cpus_per_task=1", script="linear.py")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    again = json.loads((tmp_path / "lin" / "linear_results.json").read_text())["epochs"][-1]
    assert again["epoch"] == 3 and again["top1"] == final["top1"] and again["top5"] == final["top5"]


def _distil(root, run, arch: str) -> None:
    """SEED distillation of `arch` from a random convnet teacher: 40 steps of 64 Fashion-MNIST images at 32 px
    (about half a minute on 2 CPU cores), in this process. Enough to give the student features a linear
    layer can use, which a freshly initialised EfficientNet / MobileNetV3 barely has."""
    from seed_cluster.distributed import DistEnv
    from seed_cluster.launcher import load_config
    from seed_cluster.preemption import Preemption
    from seed_cluster.trainer import Trainer

    cfg = load_config(["data=fashion_mnist", f"data.train={root / 'train.beton'}", "data.val=null",
                       "data.batch_size_per_rank=64", "data.num_workers=1", f"student.arch={arch}", "method=seed",
                       "teacher=convnet_m", "method.dim=32", "method.queue_size=512", "method.tau_t=0.05",
                       "optim.max_steps=40", "optim.base_lr=0.12", "optim.warmup_epochs=0", "optim.precision=bf16",
                       "checkpoint.every_steps=40", "logging.progress_bar=false", f"run_dir={run}", "device=cpu"])
    Trainer(cfg, DistEnv.detect(), Preemption()).train()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["efficientnet_b0", "mobilenetv3_large_100"])
def test_distilled_efficientnet_and_mobilenet_students_in_the_seed_layout_beat_chance_by_far(fmnist_small, tmp_path,
                                                                                             arch):
    """Distil the student briefly, save it as SEED's release files are laid out, linear-evaluate that file."""
    from seed_cluster.evaluate import load_backbone

    _distil(fmnist_small, tmp_path / "run", arch)
    seed_release_file(tmp_path / "student.pth.tar", arch, backbone=load_backbone(tmp_path / "run").backbone)
    cfg = load_eval_config(_overrides(fmnist_small, tmp_path / "lin", f"source.checkpoint={tmp_path / 'student.pth.tar'}",
                                      f"source.arch={arch}", "linear.epochs=8", "linear.milestones=[6]",
                                      "linear.base_lr=0.01", "linear.feature_norm=true"))
    final = run_linear(cfg)
    history = json.loads((tmp_path / "lin" / "linear_results.json").read_text())["epochs"]
    # Chance is 10%; measured here 27.6% (EfficientNet-B0) and 30.4% (MobileNetV3), so > 20% leaves margin for
    # thread-count and BLAS differences. The same students score 42-44% with kNN: 248 SGD steps on augmented views
    # do not reach what their features hold. Without linear.feature_norm EfficientNet-B0 stayed at 9-15% for every
    # lr tried (SEED's 30 x batch/256 down to 1e-2 x batch/256): its feature dimensions differ widely in scale.
    assert final["epoch"] == 8 and final["top1"] > 20.0, history
    assert all(math.isfinite(h["train_loss"]) for h in history)
    results = json.loads((tmp_path / "lin" / "results.json").read_text())
    assert results["run"]["student"] == arch
