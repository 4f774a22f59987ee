"""Helpers of the training tests (and of other tests that train a tiny run): the tiny experiment config, the
weights of a checkpoint, the largest difference between two state dicts, the steps MLflow holds a metric for."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file


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
