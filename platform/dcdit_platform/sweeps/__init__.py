"""Sweeps on Ray Tune (transitional: re-exports dcdit_platform.sweep until it is split into this package)."""

from dcdit_platform.sweep import FAILED, FINISHED, eval_protocol, load_sweep, run_sweep

__all__ = ["load_sweep", "run_sweep", "eval_protocol", "FINISHED", "FAILED"]
