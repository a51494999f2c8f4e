"""results.json per run, TensorBoard hparams, and the paper-like table."""

from __future__ import annotations

import json

from eval_fixtures import seed_cluster_checkpoint

from seed_cluster.report import main, read_results, record, table


def test_record_merges_sections_atomically_and_writes_hparams(tmp_path):
    record(tmp_path, "knn", {"knn20_top1": 61.25, "knn1_top1": 58.0}, {"student": "resnet18", "teacher": None})
    record(tmp_path, "linear", {"top1": 70.5, "top5": 90.0}, {"method": "seed", "epochs": 200})
    results = read_results(tmp_path)
    assert results["knn"]["knn20_top1"] == 61.25 and results["linear"]["top5"] == 90.0
    assert results["run"] == {"student": "resnet18", "method": "seed", "epochs": 200}
    assert not list(tmp_path.glob(".*tmp*"))
    events = list((tmp_path / "tensorboard" / "results").rglob("events.out.tfevents.*"))
    assert events, "hparams must be written for TensorBoard"


def test_table_prints_one_row_per_run_with_the_paper_columns(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    record(a, "knn", {"knn20_top1": 61.25, "knn1_top1": 58.0},
           {"student": "efficientnet_b0", "teacher": "resnet50 (mocov2.pth)", "method": "seed", "epochs": 200})
    record(a, "linear", {"top1": 67.6, "top5": 87.9})
    seed_cluster_checkpoint(b / "checkpoints" / "step-00000007.pt", "convnet_s")  # no results yet
    text = table([a, b])
    lines = text.splitlines()
    assert "student" in lines[0] and "linear top-1" in lines[0] and len(lines) == 4
    assert "efficientnet_b0" in lines[2] and "67.6" in lines[2] and "61.2" in lines[2] and "87.9" in lines[2]
    assert "convnet_s" in lines[3] and "seed" in lines[3]
    assert main([str(a), str(b)]) == 0
    assert "efficientnet_b0" in capsys.readouterr().out
    assert main([str(a), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["top1"] == 67.6
    assert main([str(tmp_path / "missing")]) == 2
