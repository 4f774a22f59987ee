"""The training reader: disjoint rank slices covering the epoch, exact resume from a cursor, prefetch, errors."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from dcdit.data import DataReader, SyntheticDataset, epoch_order, write_dataset, open_dataset
from dcdit.errors import DCDiTError


class IndexSource:
    """A trivial source whose sample i is the value i (latent layout), to check orders cheaply."""

    layout = "latents"
    num_classes = 10

    def __init__(self, n: int, shard_size: int | None = None):
        self.n = n
        self.shard_size = shard_size
        self.reads = 0

    def __len__(self):
        return self.n

    @property
    def shard_ranges(self):
        if self.shard_size is None:
            return None
        return [(s, min(s + self.shard_size, self.n)) for s in range(0, self.n, self.shard_size)]

    def read(self, indices):
        self.reads += 1
        return np.asarray(indices, np.float16).reshape(-1, 1, 1, 1), np.asarray(indices) % 10


def take(reader: DataReader, steps: int) -> list[list[int]]:
    out = [next(reader).index.tolist() for _ in range(steps)]
    return out


def test_two_ranks_are_disjoint_cover_the_epoch_and_take_equal_steps():
    n, batch = 103, 8
    readers = [DataReader(IndexSource(n), batch_size=batch, rank=r, world_size=2, seed=5, epochs=1) for r in (0, 1)]
    seen = [[i for b in r for i in b.index.tolist()] for r in readers]
    assert len(seen[0]) == len(seen[1]) == (n // 16) * 8  # equal step counts: DDP needs them
    assert not set(seen[0]) & set(seen[1])
    union = set(seen[0]) | set(seen[1])
    assert len(union) == 96 and union <= set(range(n))
    # The dropped tail is the end of this epoch's permutation, not a fixed set of samples.
    assert set(range(n)) - union == set(epoch_order(n, 5, 0)[96:].tolist())


def test_epochs_reshuffle_and_drop_last_false_shares_the_tail_evenly():
    a0 = epoch_order(50, 1, 0)
    assert sorted(a0.tolist()) == list(range(50))
    assert not np.array_equal(a0, epoch_order(50, 1, 1))
    np.testing.assert_array_equal(a0, epoch_order(50, 1, 0))
    readers = [DataReader(IndexSource(55), batch_size=8, rank=r, world_size=3, drop_last=False, epochs=1)
               for r in range(3)]
    batches = [[b.index.tolist() for b in r] for r in readers]
    # Two full steps of 3 x 8, then the remaining 7 shared as 2 per rank (one sample dropped): equal counts.
    assert [[len(step) for step in b] for b in batches] == [[8, 8, 2]] * 3
    assert readers[0].steps_per_epoch == 3
    seen = [i for b in batches for step in b for i in step]
    assert len(seen) == len(set(seen)) == 54


def test_cursor_restores_exactly_the_remaining_sequence():
    src = SyntheticDataset(90, seed=1)
    first = DataReader(src, batch_size=4, rank=1, world_size=2, seed=7)
    take(first, 5)
    cursor = json.loads(json.dumps(first.cursor))  # what a checkpoint stores
    expected = [next(first) for _ in range(20)]  # crosses the epoch boundary (11 steps per epoch)
    first.close()
    resumed = DataReader(src, batch_size=4, rank=1, world_size=2, seed=7, cursor=cursor)
    got = [next(resumed) for _ in range(20)]
    resumed.close()
    for a, b in zip(expected, got):
        assert a.index.tolist() == b.index.tolist()
        torch.testing.assert_close(a.x, b.x)
        assert torch.equal(a.y, b.y)
    assert cursor == {"epoch": 0, "position": 40, "seed": 7, "num_samples": 90, "order": "global"}


def test_cursor_is_the_position_of_the_last_batch_handed_out_not_of_prefetch():
    reader = DataReader(IndexSource(1000), batch_size=10, prefetch=8)
    next(reader)
    deadline = time.monotonic() + 60
    while not reader._queue.full() and time.monotonic() < deadline:  # until the prefetch thread is 8 batches ahead
        time.sleep(0.01)
    assert reader._queue.full() and reader.cursor["position"] == 10
    reader.close()


def test_restoring_with_another_world_size_continues_the_global_order():
    src = IndexSource(200)
    one = DataReader(src, batch_size=8, world_size=1, seed=3)
    take(one, 3)
    cursor = one.cursor
    nxt = take(one, 2)  # the next 16 samples of the global order
    two = [DataReader(src, batch_size=4, rank=r, world_size=2, seed=3, cursor=cursor) for r in (0, 1)]
    steps = [take(r, 2) for r in two]
    assert sorted(steps[0][0] + steps[1][0] + steps[0][1] + steps[1][1]) == sorted(nxt[0] + nxt[1])


def test_bad_cursor_and_settings_are_user_errors():
    src = IndexSource(64)
    with pytest.raises(DCDiTError, match="seed=1 but this reader has seed=2"):
        DataReader(src, batch_size=4, seed=2, cursor={"epoch": 0, "position": 8, "seed": 1, "num_samples": 64})
    with pytest.raises(DCDiTError, match="num_samples"):
        DataReader(src, batch_size=4, cursor={"epoch": 0, "position": 8, "num_samples": 65})
    with pytest.raises(DCDiTError, match="order=global but this reader has order=window-2"):
        DataReader(IndexSource(64, 16), batch_size=4, shuffle_window=2, cursor={"epoch": 0, "position": 8,
                                                                                 "order": "global"})
    with pytest.raises(DCDiTError, match="integer 'epoch'"):
        DataReader(src, batch_size=4, cursor={"step": 3})
    with pytest.raises(DCDiTError, match="fewer than one step"):
        DataReader(src, batch_size=40, world_size=2)
    with pytest.raises(DCDiTError, match="rank 2"):
        DataReader(src, batch_size=4, rank=2, world_size=2)


def test_pixels_become_float_chw_in_minus_one_to_one():
    src = SyntheticDataset(32, image_size=16, seed=0)
    with DataReader(src, batch_size=8, shuffle=False) as reader:
        batch = next(reader)
    images, labels = src.read(np.arange(8))
    assert batch.x.shape == (8, 3, 16, 16) and batch.x.dtype == torch.float32 and batch.x.is_contiguous()
    assert batch.y.dtype == torch.int64 and batch.y.tolist() == labels.tolist()
    torch.testing.assert_close(batch.x, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)


def test_shuffle_window_keeps_each_step_within_a_few_shards():
    src = IndexSource(400, shard_size=50)
    order = epoch_order(400, 0, 0, shard_ranges=src.shard_ranges, shuffle_window=2)
    assert sorted(order.tolist()) == list(range(400))
    reader = DataReader(src, batch_size=20, seed=0, shuffle_window=2, epochs=1)
    for batch in reader:
        assert len(set((batch.index // 50).tolist())) <= 2
    full = epoch_order(400, 0, 0)
    assert len(set((torch.from_numpy(full[:20]) // 50).tolist())) > 2  # a global permutation touches many


def test_errors_in_the_prefetch_thread_reach_the_training_loop(tmp_path):
    write_dataset(str(tmp_path / "ds"), SyntheticDataset(64, seed=0), shard_size=16)
    shard = tmp_path / "ds" / "shard-00002.parquet"
    payload = bytearray(shard.read_bytes())
    payload[len(payload) // 2] ^= 0xFF
    shard.write_bytes(bytes(payload))
    reader = DataReader(open_dataset(str(tmp_path / "ds")), batch_size=16, shuffle=False)
    next(reader)
    next(reader)
    with pytest.raises(DCDiTError, match="shard-00002.parquet .*corrupt"):
        next(reader)
    assert reader._thread is None


def test_close_stops_the_thread_and_iteration_restarts_at_the_cursor():
    reader = DataReader(IndexSource(100), batch_size=5, seed=1)
    a = take(reader, 2)
    thread = reader._thread
    reader.close()
    assert not thread.is_alive()
    b = take(reader, 1)
    c = take(DataReader(IndexSource(100), batch_size=5, seed=1), 3)
    assert a + b == c
