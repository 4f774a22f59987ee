"""`dcdit bench --mode sample` on tiny models: what each case's sampling costs per image (FLOPs counted over the
whole sampling call, per image, both guidance branches, every step) and the ratios against the baseline, recomputed
here from the rows (no timing asserts)."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dcdit.config import preset
from dcdit.models import build_model
from dcdit_platform.cli import main

STEPS = 2  # DDIM's 2 evenly strided steps of 1000


@pytest.fixture(scope="module")
def summary():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["bench", "--mode", "sample", "DiT-S/8", "DC-DiT-S", "--image-size", "64", "--batch", "2",
                     "--steps", str(STEPS), "--repeats", "1", "--warmup", "0", "--rho", "0", "0.4", "--json"])
    assert code == 0
    return json.loads(out.getvalue().strip().splitlines()[-1])


def test_dit_sampling_flops_are_both_branches_of_every_step(summary):
    rows = {r["case"]: r for r in summary["results"]}
    assert set(rows) == {"DiT-S/8 cfg"} | {f"DC-DiT-S {g}, rho {r}" for g in ("cfg", "lite-cfg") for r in (0, 0.4)}
    assert summary["baseline"] == "DiT-S/8 cfg"
    # One forward of one image, counted by torch's counter directly: CFG runs two per step.
    config = preset("DiT-S/8", input_size=8)
    model = build_model(config).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.tensor([3]))
    per_forward = counter.get_total_flops()
    dit = rows["DiT-S/8 cfg"]
    assert dit["gflops_per_image_measured"] == pytest.approx(2 * STEPS * per_forward / 1e9, rel=2e-3)
    assert dit["gflops_per_image_analytic"] == pytest.approx(dit["gflops_per_image_measured"], rel=0.02)


def test_ratios_against_the_baseline(summary):
    rows = {r["case"]: r for r in summary["results"]}
    base = rows[summary["baseline"]]
    assert base["time_ratio"] == base["flop_ratio"] == 1 and base["wall_saving_over_flop_saving"] is None
    for r in summary["results"]:
        time_ratio = r["seconds_per_image"] / base["seconds_per_image"]
        flop_ratio = r["gflops_per_image_measured"] / base["gflops_per_image_measured"]
        assert r["time_ratio"] == pytest.approx(time_ratio, rel=0.01, abs=1e-3)
        assert r["flop_ratio"] == pytest.approx(flop_ratio, rel=0.01)
        assert r["images_per_s"] == pytest.approx(1 / r["seconds_per_image"], rel=0.01)
        if r["wall_saving_over_flop_saving"] is not None:
            assert r["wall_saving_over_flop_saving"] == pytest.approx((1 - time_ratio) / (1 - flop_ratio), rel=0.02,
                                                                      abs=0.01)
        else:
            assert flop_ratio >= 1 - 1e-6  # only where nothing is saved


def test_tail_drop_and_lite_cfg_cut_dcdit_flops_as_the_analytic_count_says(summary):
    rows = {r["case"]: r for r in summary["results"]}
    cfg0, cfg4 = rows["DC-DiT-S cfg, rho 0"], rows["DC-DiT-S cfg, rho 0.4"]
    lite0, lite4 = rows["DC-DiT-S lite-cfg, rho 0"], rows["DC-DiT-S lite-cfg, rho 0.4"]
    measured = [r["gflops_per_image_measured"] for r in (cfg0, lite0, lite4)]
    assert measured == sorted(measured, reverse=True) and cfg4["gflops_per_image_measured"] < measured[0]
    # At the tokens each forward kept, the analytic count is the counter's within 2% (it counts matmuls alike; the
    # rest is elementwise work neither side weighs the same way). At the nominal 1/N it is not: the calibrated
    # router's kept fraction drifts with x_t and t, which is why both are reported.
    for r in (cfg0, cfg4, lite0, lite4):
        assert r["gflops_per_image_analytic_at_kept"] == pytest.approx(r["gflops_per_image_measured"], rel=0.02)
        assert 0 < r["kept_fraction"] < 1
    assert cfg4["kept_fraction"] < cfg0["kept_fraction"] and lite0["kept_fraction"] < cfg0["kept_fraction"]


@pytest.mark.parametrize("flags, words", [
    (["--rho", "1.0"], "--rho 1.0"),
    (["--baseline", "DiT-B/2"], "--baseline DiT-B/2"),
    (["--steps", "0"], "--steps"),
    (["--precision", "bf16"], "--precision"),
])
def test_bad_sampling_flags_are_refused(flags, words, capsys):
    assert main(["bench", "--mode", "sample", "DiT-S/8", "--image-size", "64", *flags]) == 2
    assert words in capsys.readouterr().err
