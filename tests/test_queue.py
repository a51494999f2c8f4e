"""EmbeddingQueue: ring-buffer semantics, state_dict round trip, identical queues across gloo ranks."""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from gloo_ranks import run_ranks

from seed_cluster.errors import ConfigError
from seed_cluster.queue import EmbeddingQueue


class ReferenceRing:
    """A Python list written one row at a time: the specification of the queue."""

    def __init__(self, initial: torch.Tensor) -> None:
        self.rows = [row.clone() for row in initial]
        self.ptr = 0
        self.filled = 0

    def enqueue(self, keys: torch.Tensor) -> None:
        for row in keys:
            self.rows[self.ptr] = row.clone()
            self.ptr = (self.ptr + 1) % len(self.rows)
            self.filled = min(self.filled + 1, len(self.rows))

    def tensor(self) -> torch.Tensor:
        return torch.stack(self.rows)


def _keys(batch: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


def _assert_matches(queue: EmbeddingQueue, ref: ReferenceRing) -> None:
    assert torch.equal(queue.embeddings, ref.tensor())
    assert queue.ptr.item() == ref.ptr
    assert queue.filled.item() == ref.filled


def test_initial_queue_is_unit_norm_random_and_reproducible_with_a_generator():
    a = EmbeddingQueue(10, 4, generator=torch.Generator().manual_seed(0))
    b = EmbeddingQueue(10, 4, generator=torch.Generator().manual_seed(0))
    assert a.embeddings.shape == (10, 4) and a.embeddings.dtype == torch.float32
    torch.testing.assert_close(a.embeddings.norm(dim=1), torch.ones(10))
    assert torch.equal(a.embeddings, b.embeddings)
    assert a.ptr.dtype == torch.int64 and a.ptr.ndim == 0 and a.ptr.item() == 0
    assert a.filled.dtype == torch.int64 and a.filled.ndim == 0 and a.filled.item() == 0
    assert a.fill_fraction().item() == 0.0


def test_embeddings_is_the_buffer_itself_not_a_copy():
    q = EmbeddingQueue(5, 3)
    assert q.embeddings is q.queue


@pytest.mark.parametrize("size,batch", [(10, 3), (10, 5), (7, 7), (10, 1), (16, 6)])
def test_wraparound_over_many_enqueues_equals_reference_ring(size, batch):
    q = EmbeddingQueue(size, 4, generator=torch.Generator().manual_seed(1))
    ref = ReferenceRing(q.embeddings)
    for step in range(23):
        keys = _keys(batch, 4, seed=step)
        q.enqueue(keys)
        ref.enqueue(keys)
        _assert_matches(q, ref)
        assert q.fill_fraction().item() == pytest.approx(min((step + 1) * batch, size) / size)


def test_batch_larger_than_queue_keeps_the_last_rows_where_sequential_writes_leave_them():
    q = EmbeddingQueue(10, 4, generator=torch.Generator().manual_seed(2))
    ref = ReferenceRing(q.embeddings)
    for step, batch in enumerate([3, 25, 4, 10, 31, 1, 20]):
        keys = _keys(batch, 4, seed=100 + step)
        q.enqueue(keys)
        ref.enqueue(keys)
        _assert_matches(q, ref)
    assert q.fill_fraction().item() == 1.0


def test_enqueue_ignores_autograd_and_casts_to_queue_dtype():
    q = EmbeddingQueue(6, 4)
    keys = _keys(2, 4, seed=3).bfloat16().requires_grad_()
    q.enqueue(keys)
    assert not q.embeddings.requires_grad and q.embeddings.dtype == torch.float32
    assert torch.equal(q.embeddings[:2], keys.detach().float())


def test_enqueue_of_empty_batch_changes_nothing():
    q = EmbeddingQueue(6, 4)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q.enqueue(torch.empty(0, 4))
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())


def test_enqueue_rejects_keys_of_the_wrong_width():
    q = EmbeddingQueue(6, 4)
    with pytest.raises(ValueError, match=r"\[B, 4\]"):
        q.enqueue(torch.zeros(2, 5))


@pytest.mark.parametrize("size,dim", [(0, 4), (4, 0), (-1, 3)])
def test_nonpositive_size_or_dim_raises_config_error(size, dim):
    with pytest.raises(ConfigError):
        EmbeddingQueue(size, dim)


def test_state_dict_round_trip_resumes_identically():
    q = EmbeddingQueue(10, 4, generator=torch.Generator().manual_seed(4))
    for step in range(5):
        q.enqueue(_keys(3, 4, seed=step))
    state = {k: v.clone() for k, v in q.state_dict().items()}
    assert set(state) == {"queue", "ptr", "filled"}

    restored = EmbeddingQueue(10, 4, generator=torch.Generator().manual_seed(999))
    restored.load_state_dict(state)
    for step in range(5, 12):
        keys = _keys(3, 4, seed=step)
        q.enqueue(keys)
        restored.enqueue(keys)
        assert torch.equal(q.embeddings, restored.embeddings)
        assert torch.equal(q.ptr, restored.ptr) and torch.equal(q.filled, restored.filled)


def test_queue_state_is_saved_with_a_parent_module(tmp_path):
    model = torch.nn.Module()
    model.queue = EmbeddingQueue(8, 2)
    model.queue.enqueue(_keys(3, 2, seed=0))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    other = torch.nn.Module()
    other.queue = EmbeddingQueue(8, 2)
    other.load_state_dict(torch.load(tmp_path / "m.pt"))
    assert torch.equal(other.queue.embeddings, model.queue.embeddings)
    assert other.queue.ptr.item() == 3 and other.queue.filled.item() == 3


def test_loading_a_queue_of_another_size_fails_loudly():
    small = EmbeddingQueue(8, 2)
    with pytest.raises(RuntimeError, match="size mismatch"):
        EmbeddingQueue(16, 2).load_state_dict(small.state_dict())


# --- two real gloo ranks -------------------------------------------------------------------------

WORLD, SIZE, DIM, BATCH, STEPS = 2, 10, 4, 3, 7


def _rank_keys(rank: int, step: int) -> torch.Tensor:
    return _keys(BATCH, DIM, seed=1000 * rank + step)


def _gloo_worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        q = EmbeddingQueue(SIZE, DIM, generator=torch.Generator().manual_seed(5))
        for step in range(STEPS):
            q.enqueue(_rank_keys(rank, step))  # every rank enqueues different keys
        torch.save(q.state_dict(), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_gloo_ranks_hold_identical_queue_equal_to_rank_ordered_reference(tmp_path):
    run_ranks(_gloo_worker, str(tmp_path), nprocs=WORLD)

    ref = ReferenceRing(EmbeddingQueue(SIZE, DIM, generator=torch.Generator().manual_seed(5)).embeddings)
    for step in range(STEPS):
        ref.enqueue(torch.cat([_rank_keys(r, step) for r in range(WORLD)]))
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for state in states:
        assert torch.equal(state["queue"], ref.tensor())
        assert state["ptr"].item() == ref.ptr == (STEPS * WORLD * BATCH) % SIZE
        assert state["filled"].item() == SIZE
    assert torch.equal(states[0]["queue"], states[1]["queue"])
