"""Process-group helpers on two real gloo ranks."""

from __future__ import annotations

import datetime
import json

import pytest
import torch.distributed as dist
from gloo_ranks import run_ranks

from seed_cluster.distributed import all_reduce_max, broadcast_object


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        # Each rank lists "its" finished chunks; all must act on rank 0's list.
        seen = broadcast_object({"rank": rank, "done": [0, 3] if rank == 0 else [0, 1, 2, 3]})
        largest = all_reduce_max(rank + 5)
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump({"seen": seen, "largest": largest}, f)
    finally:
        dist.destroy_process_group()


def test_broadcast_object_without_a_process_group_returns_the_object():
    value = {"done": [1, 2]}
    assert broadcast_object(value) is value


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_every_rank_gets_rank_0s_object(tmp_path):
    run_ranks(_worker, str(tmp_path))
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result == {"seen": {"rank": 0, "done": [0, 3]}, "largest": 6.0}
