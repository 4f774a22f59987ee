"""The training reader: a deterministic per-epoch order split across DDP ranks, exact resume, background prefetch.

Step s of an epoch consumes samples [s*B*W, (s+1)*B*W) of the epoch's permutation; rank r takes its B of them.
The cursor (epoch, global position) is independent of the rank, so a checkpoint restores every rank exactly.
"""

from __future__ import annotations

import queue
import threading
import warnings
import weakref
from collections.abc import Iterator
from typing import NamedTuple, Protocol

import numpy as np
import torch

from dcdit.errors import DCDiTError


class Source(Protocol):
    """What the reader reads from: `SyntheticDataset` and `ShardDataset` both implement it."""

    layout: str  # "pixels" (uint8 HWC) or "latents" (float16 CHW)
    num_classes: int

    def __len__(self) -> int: ...
    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class Batch(NamedTuple):
    """x: float32 [B, C, H, W] (pixels in [-1, 1], or latents); y: int64 labels [B]; index: int64 sample ids [B]."""

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor


def to_model_input(data: np.ndarray, layout: str) -> torch.Tensor:
    """Raw samples -> the model's input: uint8 HWC pixels to float CHW in [-1, 1], float16 latents to float32."""
    if layout == "pixels":
        return torch.from_numpy(np.ascontiguousarray(data.transpose(0, 3, 1, 2))).float().div_(127.5).sub_(1.0)
    if layout == "latents":
        return torch.from_numpy(np.ascontiguousarray(data)).float()
    raise DCDiTError(f"unknown data layout {layout!r} (expected 'pixels' or 'latents')")


def epoch_order(num_samples: int, seed: int, epoch: int, *, shuffle: bool = True,
                shard_ranges: list[tuple[int, int]] | None = None, shuffle_window: int | None = None) -> np.ndarray:
    """The epoch's sample order: a permutation that depends only on (seed, epoch) and the settings.

    With `shuffle_window=k` (and the source's shard ranges) shards are visited in a random order, k at a time,
    shuffled within each group of k: every step touches at most ~k shards, so a cache of k shards suffices
    for datasets larger than memory. Without it the permutation is global.
    """
    if not shuffle:
        return np.arange(num_samples, dtype=np.int64)
    rng = np.random.default_rng([seed, epoch])
    if shuffle_window is None or not shard_ranges:
        return rng.permutation(num_samples).astype(np.int64)
    shard_order = rng.permutation(len(shard_ranges))
    parts = []
    for g in range(0, len(shard_order), shuffle_window):
        group = np.concatenate([np.arange(*shard_ranges[i], dtype=np.int64) for i in shard_order[g:g + shuffle_window]])
        parts.append(rng.permutation(group))
    return np.concatenate(parts)


class DataReader:
    """Iterator of `Batch`es for rank `rank` of `world_size`, `batch_size` samples each, forever (or `epochs`).

    Every rank makes the same number of steps per epoch (the tail that does not fill a step on every rank is
    dropped, or with `drop_last=False` shared out evenly). `cursor` after a batch is a small dict; pass it back
    as `cursor=` to continue at exactly the next sample, also with a different world size or batch size.
    A background thread keeps up to `prefetch` batches ready.
    """

    def __init__(self, source: Source, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True, shuffle_window: int | None = None,
                 epochs: int | None = None, prefetch: int = 4, cursor: dict | None = None):
        if batch_size < 1:
            raise DCDiTError(f"reader batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise DCDiTError(f"reader rank {rank} is outside world_size {world_size}")
        if seed < 0:
            raise DCDiTError(f"reader seed must be >= 0, got {seed}")
        if shuffle_window is not None and shuffle_window < 1:
            raise DCDiTError(f"reader shuffle_window must be >= 1 shard or None, got {shuffle_window}")
        n = len(source)
        if n < batch_size * world_size:
            raise DCDiTError(f"dataset has {n} samples, fewer than one step of {world_size} ranks x {batch_size}; "
                             "lower the batch size or prepare more samples")
        self.source = source
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.shuffle_window, self.epochs, self.prefetch = shuffle_window, epochs, max(1, prefetch)
        self.num_samples = n
        cache_bytes = getattr(source, "cache_bytes", None)
        dataset_bytes = n * getattr(getattr(source, "manifest", None), "sample_bytes", 0)
        if shuffle and shuffle_window is None and cache_bytes is not None and dataset_bytes > cache_bytes:
            warnings.warn(f"the dataset ({dataset_bytes / 2**30:.1f} GiB decoded) exceeds the shard cache "
                          f"({cache_bytes / 2**30:.1f} GiB): a global shuffle will re-read shards; set shuffle_window "
                          "or a larger cache", stacklevel=2)
        self._cursor = self._validate_cursor(cursor) if cursor is not None else {"epoch": 0, "position": 0}
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Steps of a full epoch (the same on every rank)."""
        step = self.batch_size * self.world_size
        full, rest = divmod(self.num_samples, step)
        return full + (0 if self.drop_last or rest < self.world_size else 1)

    def __len__(self) -> int:
        return self.steps_per_epoch

    @property
    def cursor(self) -> dict:
        """Where the next batch starts: JSON-able, the same on every rank; save it in checkpoints."""
        return {**self._cursor, "seed": self.seed, "num_samples": self.num_samples, "order": self._order_name}

    @property
    def _order_name(self) -> str:
        if not self.shuffle:
            return "sequential"
        return "global" if self.shuffle_window is None else f"window-{self.shuffle_window}"

    def _validate_cursor(self, cursor: dict) -> dict:
        try:
            epoch, position = int(cursor["epoch"]), int(cursor["position"])
        except (KeyError, TypeError, ValueError):
            raise DCDiTError(f"reader cursor {cursor!r} needs integer 'epoch' and 'position'") from None
        for key, mine in (("seed", self.seed), ("num_samples", self.num_samples), ("order", self._order_name)):
            if key in cursor and cursor[key] != mine:
                raise DCDiTError(f"reader cursor was saved with {key}={cursor[key]} but this reader has {key}={mine}; "
                                 "resume with the same dataset, data seed and shuffle settings")
        if epoch < 0 or not 0 <= position <= self.num_samples:
            raise DCDiTError(f"reader cursor {cursor!r} is out of range for {self.num_samples} samples")
        return {"epoch": epoch, "position": position}

    def plan(self) -> Iterator[tuple[np.ndarray, dict]]:
        """(this rank's sample indices, cursor after the step) for every step from the current cursor; no I/O."""
        epoch, position = self._cursor["epoch"], self._cursor["position"]
        step, world, n = self.batch_size * self.world_size, self.world_size, self.num_samples
        shard_ranges = getattr(self.source, "shard_ranges", None)
        while self.epochs is None or epoch < self.epochs:
            order = epoch_order(n, self.seed, epoch, shuffle=self.shuffle, shard_ranges=shard_ranges,
                                shuffle_window=self.shuffle_window)
            while True:
                remaining = n - position
                if remaining >= step:
                    per_rank = self.batch_size
                elif not self.drop_last and remaining >= world:
                    per_rank = remaining // world  # a smaller last step, equal on every rank
                else:
                    break
                start = position + self.rank * per_rank
                position += per_rank * world
                nxt = {"epoch": epoch, "position": position}
                if n - position < (world if not self.drop_last else step):
                    nxt = {"epoch": epoch + 1, "position": 0}
                yield order[start:start + per_rank], nxt
            epoch, position = epoch + 1, 0

    def __iter__(self) -> DataReader:
        return self

    def __next__(self) -> Batch:
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if item is _END:
            self._thread = None
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        batch, self._cursor = item
        return batch

    def _start(self) -> None:
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._stop = threading.Event()
        # The thread must not reference `self`, or an abandoned reader would never be collected.
        self._thread = threading.Thread(target=_produce, args=(self.plan(), self.source, self._queue, self._stop),
                                        name=f"dcdit-reader-rank{self.rank}", daemon=True)
        self._thread.start()
        weakref.finalize(self, self._stop.set)

    def close(self) -> None:
        """Stop the prefetch thread; iterating again restarts from the current cursor."""
        if self._stop is not None:
            self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._thread = self._queue = self._stop = None

    def __enter__(self) -> DataReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_END = object()


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _produce(plan: Iterator[tuple[np.ndarray, dict]], source: Source, q: queue.Queue, stop: threading.Event) -> None:
    try:
        for indices, cursor in plan:
            if stop.is_set():
                return
            data, labels = source.read(indices)
            batch = Batch(x=to_model_input(data, source.layout), y=torch.from_numpy(labels.astype(np.int64)),
                          index=torch.from_numpy(indices.copy()))
            if not _put(q, (batch, cursor), stop):
                return
        _put(q, _END, stop)
    except BaseException as err:  # handed to the consumer, which re-raises it
        _put(q, err, stop)
