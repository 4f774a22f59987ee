"""`dcdit bench` end to end on tiny inputs: the JSON it prints has what the speed report needs, the stage profiles
included (no timing asserts); benchmarks/gpu_check.py on a machine without CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_bench_reports_rates_for_dit_dcdit_and_the_reference():
    proc = subprocess.run(
        [sys.executable, "-m", "dcdit_platform.cli", "bench", "DiT-S/8", "DC-DiT-S", "--image-size", "64",
         "--batch", "2", "--repeats", "1", "--warmup", "0", "--precision", "fp32", "bf16", "--reference",
         "--threads", "1", "--profile", "--json"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(summary["machine_matmul_gflops"]) == {"fp32", "bf16"}
    rows = {(r["model"], r["precision"]): r for r in summary["results"]}
    assert set(rows) == {(m, p) for m in ("DiT-S/8", "DiT-S/8 (diffusers)", "DC-DiT-S") for p in ("fp32", "bf16")}
    for row in rows.values():
        # Forward + backward is about three forwards (two matmuls per forward matmul in the backward).
        assert 2.5 < row["flops_per_step"] / row["forward_flops"] < 3.5
        # The rates are the step's FLOPs over its median time, and that over the same run's matmul rate.
        assert row["gflops_per_s"] == pytest.approx(row["flops_per_step"] / row["step_ms"] / 1e6, rel=2e-3, abs=0.01)
        machine = summary["machine_matmul_gflops"][row["precision"]]
        assert row["fraction_of_machine_matmul"] == pytest.approx(row["gflops_per_s"] / machine, rel=2e-3, abs=1e-3)
    assert 0.2 < rows[("DC-DiT-S", "fp32")]["kept_fraction"] < 0.3
    # The reference does the same matmul work as ours, plus re-embedding t and y in every block (per sample, so
    # about 8% here where a sample is a single token, negligible at 256 tokens).
    ours, ref = rows[("DiT-S/8", "fp32")], rows[("DiT-S/8 (diffusers)", "fp32")]
    assert 0.85 < ours["forward_flops"] / ref["forward_flops"] <= 1.0
    # --profile: one stage table per case (perf/profile.py's own tests check what is in it).
    profiles = {(p["model"], p["precision"]): p for p in summary["profiles"]}
    assert set(profiles) == set(rows)
    assert {"de-chunk", "plug-back", "router"} <= {s["stage"] for s in profiles[("DC-DiT-S", "bf16")]["stages"]}


def test_gpu_check_without_cuda_says_so_and_succeeds():
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so this holds on a CUDA machine too.
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device here" in proc.stdout and "nothing to check" in proc.stdout
