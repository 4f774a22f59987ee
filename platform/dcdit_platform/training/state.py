"""What a training worker trains: the student (built, upcycled from a pretrained DiT, or restored from a
checkpoint), its EMA, AdamW over the trainable parameters and the DDP wrapper (`TrainState`); and the frozen
teacher the upcycling warm-up distils from (`start_distiller`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from dcdit.checkpoint import Checkpoint, restore_rng_state
from dcdit.models import build_model
from dcdit.pretrained import load_dit
from dcdit.distill import BlockDistiller
from dcdit.upcycle import freeze_embedders, upcycle
from dcdit_platform.config import ExperimentConfig
from dcdit_platform.training.runtime import Runtime


@dataclass
class TrainState:
    """The modules and optimizer one worker steps."""

    model: nn.Module  # the plain model: checkpoints hold its state dict
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    params: list[torch.Tensor]  # the trainable parameters (frozen embedders excluded)
    ddp: nn.Module  # what the step runs: the DDP wrapper over `model`, or `model` itself in one process


def build_student(config: ExperimentConfig, *, fresh: bool) -> nn.Module:
    """The model to train: upcycled from `train.init_from` on a fresh run, else built from the config (a resumed
    run loads its weights from the checkpoint, so the pretrained DiT is not read again)."""
    torch.manual_seed(config.seed)  # the same initialisation on every rank
    if config.is_upcycling and fresh:
        return upcycle(config.train.init_from, config.model, cond_adaptor=config.train.cond_adaptor).model
    return build_model(config.model)


def load_teacher(config: ExperimentConfig, device: torch.device) -> nn.Module:
    """The pretrained DiT of `train.init_from`, frozen: the upcycling warm-up's teacher."""
    teacher = load_dit(config.train.init_from, num_heads=config.model.num_heads)
    return teacher.to(device).eval().requires_grad_(False)


def start_distiller(config: ExperimentConfig, model: nn.Module, start: int,
                    device: torch.device) -> BlockDistiller | None:
    """The teacher term of an upcycling run that resumes (or starts) inside its warm-up, else None.

    Steps 1..distill_steps add the teacher term, later steps are normal training. The phase is a function of the
    step, so a resumed job continues in the phase its checkpoint was in."""
    if not config.is_upcycling or start >= config.train.distill_steps:
        return None
    return BlockDistiller(model, load_teacher(config, device))


def build_train_state(config: ExperimentConfig, ckpt: Checkpoint | None, runtime: Runtime, rank: int,
                      world_size: int) -> TrainState:
    """Model, EMA (initialised from the model), optimizer, this rank's RNG, each from `ckpt` when resuming."""
    t = config.train
    model = build_student(config, fresh=ckpt is None)
    if ckpt:
        model.load_state_dict(ckpt.model_state)
    if config.is_upcycling and t.freeze_embedders:
        freeze_embedders(model)
    model.to(runtime.device)
    ema = copy.deepcopy(model).requires_grad_(False)
    if ckpt and ckpt.ema_state is not None:
        ema.load_state_dict(ckpt.ema_state)
    params = [p for p in model.parameters() if p.requires_grad]
    # train_step sets every step's learning rate (the warm-up) before it steps, so this initial one is never used.
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)
    if ckpt and ckpt.optimizer_state is not None:
        optimizer.load_state_dict(ckpt.optimizer_state)
    if ckpt and str(rank) in ckpt.state.get("rng", {}):
        restore_rng_state(ckpt.state["rng"][str(rank)])
    ddp = model
    if world_size > 1:
        ddp = DistributedDataParallel(model, device_ids=[runtime.device.index] if runtime.device.type == "cuda"
                                      else None)
    return TrainState(model=model, ema=ema, optimizer=optimizer, params=params, ddp=ddp)
