"""Sweeps on Ray Tune: a sweep YAML (base experiment, grid over dotted config keys, DiT baselines, scheduler,
resources, evaluation) becomes named trials; each trial is one Ray Train run tracked as a child of the sweep's
MLflow parent run, and resumable after the driver dies.

  spec.py       the sweep YAML schema and its parser
  trials.py     trial expansion: grid points, baselines (named or derived), names
  plan.py       load_sweep: everything checked before Ray; the evaluation protocol
  placement.py  how many trials fit on the cluster at once
  state.py      the sweep's records in storage, trial statuses, the resume check
  trainable.py  the trial as Tune runs it (train, evaluate, record)
  tuner.py      the Tuner and the driver's callback
  summary.py    the summary and its table
  driver.py     run_sweep
"""

from dcdit_platform.sweeps.plan import SweepPlan, eval_protocol, load_sweep
from dcdit_platform.sweeps.state import FAILED, FINISHED
from dcdit_platform.sweeps.summary import format_table


def __getattr__(name: str):
    # `run_sweep` pulls in Ray Tune, Ray Train and the evaluator (about 4 s of imports on the project's 2-core
    # machine); resolved on first use, so that `dcdit sweep` reports a bad sweep file without waiting for them.
    if name == "run_sweep":
        from dcdit_platform.sweeps.driver import run_sweep

        return run_sweep
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["load_sweep", "run_sweep", "eval_protocol", "SweepPlan", "format_table", "FINISHED", "FAILED"]
