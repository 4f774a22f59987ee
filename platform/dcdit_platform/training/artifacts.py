"""Pictures of training progress drawn from the EMA model: a sample grid and, for a model with a router, its
boundary maps and kept fraction along the sampling trajectory (`write_artifacts`); and when a run draws them
(`artifacts_due`: every `logging.artifacts_every` steps and the last, never when it is negative).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from dcdit.diffusion import create_diffusion, ddim_sample, per_sample_generators
from dcdit.viz import RoutingRecorder, boundary_maps, kept_fraction_curve, sample_grid
from dcdit_platform.config import ExperimentConfig
from dcdit_platform.training.runtime import Runtime


def artifacts_due(config: ExperimentConfig, step: int) -> bool:
    every = config.logging.artifacts_every
    return every >= 0 and bool((every and step % every == 0) or step == config.train.steps)


@torch.no_grad()
def write_artifacts(ema: nn.Module, config: ExperimentConfig, step: int, runtime: Runtime, out_dir: str) -> list[str]:
    """PNGs of EMA samples (DDIM, fixed per-sample seeds) and, when the model routes tokens, the router's boundary
    maps and the kept fraction along the sampling trajectory. Latent data is previewed through its first three
    channels."""
    lg, m = config.logging, config.model
    diffusion = create_diffusion(f"ddim{min(lg.sample_steps, config.diffusion.num_timesteps)}",
                                 num_timesteps=config.diffusion.num_timesteps, learn_sigma=m.learn_sigma)
    n = lg.sample_count
    classes = config.data.num_classes if config.data.is_synthetic else m.num_classes
    y = (torch.arange(n) % min(classes, m.num_classes)).to(runtime.device)
    generators = per_sample_generators([config.seed * 100_003 + i for i in range(n)])
    recorder = RoutingRecorder(ema)
    was_training = ema.training
    ema.eval()
    try:
        with runtime.autocast():
            samples = ddim_sample(diffusion, recorder, (n, m.in_channels, m.input_size, m.input_size), y,
                                  generator=generators, device=runtime.device)
    finally:
        ema.train(was_training)
    preview = samples.float().clamp(-1, 1)[:, :3].cpu()
    os.makedirs(out_dir, exist_ok=True)
    paths = [str(sample_grid(preview, os.path.join(out_dir, f"samples_step{step:08d}.png"), nrow=min(n, 8)))]
    if recorder.routings:
        probs = recorder.probs_over_time()
        picks = sorted({round(i * (len(recorder.timesteps) - 1) / 5) for i in range(6)})
        shown = min(n, 4)
        paths.append(str(boundary_maps(probs[picks, :shown], [recorder.timesteps[i] for i in picks],
                                       os.path.join(out_dir, f"boundary_maps_step{step:08d}.png"),
                                       images=preview[:shown])))
        paths.append(str(kept_fraction_curve(recorder.timesteps, recorder.kept_fraction(),
                                             os.path.join(out_dir, f"kept_fraction_step{step:08d}.png"),
                                             target=1.0 / m.downsample_factor)))
    return paths
