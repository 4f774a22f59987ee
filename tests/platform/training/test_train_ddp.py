"""DDP gradients: 2 gloo workers running the platform's training step (with and without accumulation micro-steps,
i.e. DDP's no_sync path) produce the same gradients as one process on the same global batch."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dcdit_platform.config import build_config
from dcdit_platform.raycluster import free_port
from dcdit_platform.training.data import make_reader, open_source
from dcdit_platform.training.metrics import StepStats
from dcdit_platform.training.runtime import Runtime
from dcdit_platform.training.state import build_train_state
from dcdit_platform.training.step import build_objective, train_step
from helpers.training import tiny_config

SPLITS = ((1, "accum1"), (2, "accum2"))  # per-worker grad_accum of the 2-worker runs


def _gradients(config, rank: int, world: int) -> tuple[dict, StepStats]:
    """Gradients of one training step from the fresh model (DDP-wrapped when world > 1), and its statistics."""
    runtime = Runtime(torch.device("cpu"), "fp32")
    state = build_train_state(config, None, runtime, rank, world)
    reader = make_reader(config, open_source(config), rank, world, None)
    batch = next(reader)
    reader.close()
    result = train_step(state, build_objective(config), batch.x, batch.y, step=1, config=config, runtime=runtime,
                        rank=rank, world_size=world)
    assert result.finite
    # The optimizer has stepped since, which leaves the .grad it stepped with as they were.
    return {n: p.grad.clone() for n, p in state.model.named_parameters() if p.grad is not None}, result.stats


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for accum, tag in SPLITS:
            config = build_config(tiny_config(train={"grad_clip": 0.0, "grad_accum": accum, "global_batch": 8}))
            grads, stats = _gradients(config, rank, world)
            if rank == 0:
                torch.save({"grads": grads, "stats": stats.tensor}, os.path.join(out_dir, f"{tag}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_workers_give_the_gradients_of_one_process(tmp_path):
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for accum, tag in SPLITS:
            # One process, the same global batch of 8, as 2 x accum micro-batches.
            config = build_config(tiny_config(train={"grad_clip": 0.0, "grad_accum": 2 * accum},
                                              resources={"num_workers": 1}))
            grads, stats = _gradients(config, 0, 1)
            ddp = torch.load(tmp_path / f"{tag}.pt", weights_only=True)
            assert ddp["grads"].keys() == grads.keys()
            worst = max(float((ddp["grads"][k] - grads[k]).abs().max()) for k in grads)
            assert worst <= 1e-7, (tag, worst)
            assert any(float(g.abs().max()) > 0 for g in grads.values())
            # Every named sum (losses, kept tokens, ...) covers the global batch, whichever way it was split.
            assert torch.allclose(ddp["stats"], stats.tensor, rtol=1e-9, atol=1e-12), tag
            assert stats["samples"] == 8 and StepStats(ddp["stats"])["samples"] == 8
    finally:
        torch.set_num_threads(previous)
