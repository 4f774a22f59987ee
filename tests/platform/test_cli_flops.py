"""`dcdit flops` as a user runs it: a subprocess of the installed entry point, JSON on stdout, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run_dcdit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dcdit_platform.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_flops_dit_xl2_prints_the_paper_gmacs_as_json():
    proc = run_dcdit("flops", "DiT-XL/2", "--image-size", "256", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert round(summary["gmacs"], 1) == 118.6
    assert summary["params"] == 674_834_720
    assert summary["input_size"] == 32
    # v2 convention: 2 FLOPs per MAC, +3 per attention score (28 blocks x 16 heads x 256^2 scores)
    scores = 28 * 16 * 256**2
    assert summary["tflops_per_image"] == pytest.approx((2 * summary["gmacs"] * 1e9 + 3 * scores) * 250 / 1e12,
                                                        rel=1e-4)
    assert summary["cfg_branches_counted"] == 1


def test_flops_cfg_counts_both_branches_and_steps():
    proc = run_dcdit("flops", "DiT-B/2", "--json", "--cfg", "--sampling-steps", "100")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["cfg_branches_counted"] == 2
    assert summary["tflops_per_image"] == pytest.approx(2 * summary["v2_gflops"] * 100 / 1e3, rel=1e-4)


def test_flops_lite_cfg_counts_the_unconditional_branch_at_a_tenth_of_the_kept_tokens():
    from dcdit.config import preset
    from dcdit.flops import dcdit_macs

    lite = json.loads(run_dcdit("flops", "DC-DiT-B", "--json", "--lite-cfg").stdout.strip().splitlines()[-1])
    uncond = dcdit_macs(preset("DC-DiT-B", input_size=32), 0.25 * 0.1)  # tail drop 0.9 of 1/4 kept
    assert (lite["guidance"], lite["cfg_branches_counted"]) == ("lite-cfg", 2)
    assert lite["tflops_per_image"] == pytest.approx((lite["v2_gflops"] + uncond.v2_gflops) * 250 / 1e3, rel=1e-3)


def test_flops_dcdit_measured_next_to_analytic():
    proc = run_dcdit("flops", "DC-DiT-S", "--image-size", "128", "--kept-fraction", "0.5", "--measure",
                     "--batch", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["input_size"] == 16 and summary["kept_fraction"] == 0.5
    measured = summary["measured"]
    assert measured["gmacs"] == pytest.approx(measured["analytic_gmacs_at_kept"], rel=0.03)
    assert measured["gmacs"] == pytest.approx(summary["gmacs"], rel=0.1)


def test_unknown_model_is_a_one_line_error_with_a_suggestion():
    proc = run_dcdit("flops", "DiT-XL/3", "--json")
    assert proc.returncode != 0
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "did you mean" in lines[0] and "Traceback" not in proc.stderr


def test_kept_fraction_on_a_dit_is_a_one_line_error():
    proc = run_dcdit("flops", "DiT-S/2", "--kept-fraction", "0.5")
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1 and "DC-DiT" in proc.stderr
