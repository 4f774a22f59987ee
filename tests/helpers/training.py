"""Helpers of the training tests (and of other tests that train a tiny run): the tiny experiment config, the
weights of a checkpoint, the largest difference between two state dicts, the steps MLflow holds a metric for, and
the platform's training step run in this process step by step."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

DIT = {"arch": "dit", "depth": 2, "hidden_size": 32, "num_heads": 2, "input_size": 8, "in_channels": 3,
       "num_classes": 4, "patch_size": 2}  # the DiT counterpart of tiny_config's model


def tiny_config(**sections) -> dict:
    """A 2-block DC-DiT on 8x8 synthetic pixels: steps take milliseconds; sections override keys."""
    base = {
        "seed": 3,
        "model": {"arch": "dcdit", "depth": 2, "hidden_size": 32, "num_heads": 2, "input_size": 8, "in_channels": 3,
                  "num_classes": 4, "scaffold_width": 16, "encoder_blocks": 1, "decoder_blocks": 1,
                  "downsample_factor": 4},
        "data": {"source": "synthetic", "image_size": 8, "num_classes": 4, "num_samples": 256},
        "train": {"steps": 12, "global_batch": 8, "lr": 2e-3, "ema_decay": 0.9, "chunking": {"ratio_group_size": 4}},
        "checkpoint": {"every": 4, "keep": 3, "max_failures": 2},
        "logging": {"every": 1, "artifacts_every": 0, "sample_count": 4, "sample_steps": 4},
        "resources": {"num_workers": 2},
    }
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(base.get(name), dict):
            base[name] = {**base[name], **values}
        else:
            base[name] = values
    return base


def load_weights(checkpoint_dir) -> tuple[dict, dict]:
    """(model, ema) state dicts of a local checkpoint directory."""
    checkpoint_dir = Path(checkpoint_dir)
    return load_file(str(checkpoint_dir / "model.safetensors")), load_file(str(checkpoint_dir / "ema.safetensors"))


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


def steps_logged(tracker, run_id: str, key: str = "train/loss") -> list[int]:
    return sorted(m.step for m in tracker.metric_history(run_id, key))


def step_in_process(config, steps: int, *, precision: str = "fp32") -> list[tuple[dict, object]]:
    """The platform's `train_step` + `ema_update` for `steps` steps of one worker in this process; per step, a copy
    of the model's state dict and the StepResult."""
    from dcdit_platform.training.data import make_reader, open_source
    from dcdit_platform.training.runtime import Runtime
    from dcdit_platform.training.state import build_train_state
    from dcdit_platform.training.step import build_objective, ema_update, train_step

    runtime = Runtime(torch.device("cpu"), precision)
    state = build_train_state(config, None, runtime, 0, 1)
    reader = make_reader(config, open_source(config), 0, 1, None)
    objective = build_objective(config)
    out = []
    try:
        for step in range(1, steps + 1):
            batch = next(reader)
            result = train_step(state, objective, batch.x, batch.y, step=step, config=config, runtime=runtime,
                                rank=0, world_size=1)
            ema_update(state.ema, state.model, config.train.ema_decay)
            out.append(({k: v.detach().clone() for k, v in state.model.state_dict().items()}, result))
    finally:
        reader.close()
    return out
