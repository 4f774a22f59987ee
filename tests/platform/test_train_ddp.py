"""DDP gradients: 2 gloo workers running the platform's training step (with and without accumulation micro-steps,
i.e. DDP's no_sync path) produce the same gradients as one process on the same global batch."""

from __future__ import annotations

import os

import torch
import torch.multiprocessing as mp
from dcdit_platform.config import build_config
from dcdit_platform.raycluster import free_port
from helpers.training import tiny_config

SPLITS = ((1, "accum1"), (2, "accum2"))  # per-worker grad_accum of the 2-worker runs


def _gradients(config, rank: int, world: int, grad_accum: int, ddp: bool) -> tuple[dict, torch.Tensor]:
    from dcdit_platform.train import Runtime, build_student, make_reader, open_source, train_step

    from dcdit.diffusion import create_diffusion
    from dcdit.objective import TrainingObjective

    model = build_student(config, fresh=True)
    params = [p for p in model.parameters() if p.requires_grad]
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    optimizer = torch.optim.AdamW(params, lr=0.0)  # steps, but leaves the weights (and .grad) as they are
    objective = TrainingObjective(create_diffusion(), is_dcdit=True, downsample_factor=4.0,
                                  chunking=config.train.chunking, seed=config.seed)
    reader = make_reader(config, open_source(config), rank, world, None)
    batch = next(reader)
    reader.close()
    result = train_step(wrapped, objective, optimizer, params, batch.x, batch.y, step=1, seed=config.seed, rank=rank,
                        world_size=world, grad_accum=grad_accum, grad_clip=0.0,
                        runtime=Runtime(torch.device("cpu"), "fp32"))
    assert result.finite
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, result.stats


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for accum, tag in SPLITS:
            config = build_config(tiny_config(train={"grad_clip": 0.0, "grad_accum": accum, "global_batch": 8}))
            grads, stats = _gradients(config, rank, world, accum, ddp=True)
            if rank == 0:
                torch.save({"grads": grads, "stats": stats}, os.path.join(out_dir, f"{tag}.pt"))
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
            grads, stats = _gradients(config, 0, 1, 2 * accum, ddp=False)
            ddp = torch.load(tmp_path / f"{tag}.pt", weights_only=True)
            assert ddp["grads"].keys() == grads.keys()
            worst = max(float((ddp["grads"][k] - grads[k]).abs().max()) for k in grads)
            assert worst <= 1e-7, (tag, worst)
            assert any(float(g.abs().max()) > 0 for g in grads.values())
            assert torch.allclose(ddp["stats"], stats, rtol=1e-9, atol=1e-12), tag  # losses, kept tokens, ...
    finally:
        torch.set_num_threads(previous)
