"""The study's answers to the paper's claims a-f from hand-made rows: settings grouped over seeds, each claim's
numbers and verdict (holds, the other way round, or undecided when the seeds overlap), the diagnostics added when a
claim fails, and a sweep that is no study getting no such section."""

from __future__ import annotations

from dcdit.probe import RouterProbe
from dcdit_platform.reports.ranking import group_by_protocol
from dcdit_platform.reports.records import Probe, Sweep
from dcdit_platform.reports.study import settings, study_findings, study_table
from helpers.reports import evaluation, report_row

BASE = {"model.arch": "dcdit", "model.depth": 8, "model.hidden_size": 64, "model.num_heads": 4,
        "model.input_size": 16, "model.in_channels": 3, "model.num_classes": 10, "model.scaffold_width": 16,
        "model.encoder_blocks": 1, "model.decoder_blocks": 1, "model.downsample_factor": 4.0,
        "model.router": "predictability", "train.chunking.ratio_loss_weight": 0.03}
DIT = {k: v for k, v in BASE.items() if not k.startswith(("model.scaffold", "model.encoder", "model.decoder",
                                                          "model.downsample", "model.router", "train.chunking"))}


def _probe(auc: float, kept_noisy: float, kept_clean: float) -> Probe:
    result = RouterProbe(timesteps=[900, 500, 100], auc=[auc] * 3, auc_low=[auc - 0.02] * 3,
                         auc_high=[auc + 0.02] * 3, kept=[kept_noisy, (kept_noisy + kept_clean) / 2, kept_clean],
                         kept_on_detail=[0.5] * 3, detail_share=0.37, num_images=64)
    return Probe(checkpoint="ckpt", step=1600, result=result)


def _run(name: str, seed: int, fds: list[float], gflops: float, *, config: dict, steps: int = 1600, **fields):
    """A finished run of the study: FD at four checkpoints (the last one is the run's evaluation)."""
    step_of = [steps * (i + 1) // len(fds) for i in range(len(fds))]
    row = report_row(f"{name}_seed{seed}", config.get("model.arch", "dcdit"), steps=steps,
                     config={**config, "seed": seed}, evaluations=[evaluation(fds[-1], gflops)], **fields)
    row.histories["eval/a/fd"] = list(zip(step_of, fds))
    return row


def _learned(seed, fds, *, compression=4.3, probe=None, config=BASE, name="learned", **fields):
    row = _run(name, seed, fds, 0.080, config=config, n=config["model.downsample_factor"], lam=0.03,
               kept_fraction=0.23, probe=probe, **fields)
    row.histories.update({"router/compression_natural": [(25, 2.0), (800, 3.9), (1600, compression)],
                          "train/ratio_loss": [(25, 1.3), (1600, 1.0)],
                          "optim/router_grad_norm": [(25, 0.04), (800, 0.03), (1600, 0.01)]})
    row.kept_by_t = {100: 0.3, 900: 0.2}
    return row


def _sweep(rows) -> Sweep:
    return Sweep(parent_id="p", name="study", experiment="e", tracking_uri="u", rows=rows,
                 groups=group_by_protocol(rows))


def _study(learned_fd=(40.0, 30.0), dit_fd=(50.0, 45.0), up_fd=(25.0, 28.0), compression=4.3, kept=(0.22, 0.33),
           auc=0.8):
    rows = []
    for seed in (0, 1):
        rows += [
            _learned(seed, [90.0, 60.0, 45.0, learned_fd[seed]], compression=compression,
                     probe=_probe(auc, kept[0], kept[1])),
            _run("random", seed, [95.0, 70.0, 60.0, 55.0 + seed], 0.078, config={**BASE, "model.router": "random"},
                 n=4.0, kept_fraction=0.25, probe=_probe(0.5, 0.25, 0.25)),
            _run("grid", seed, [95.0, 70.0, 52.0, 50.0 + seed], 0.076, config={**BASE, "model.router": "grid"},
                 n=4.0, kept_fraction=0.25),
            _run("flop-matched", seed, [80.0, 60.0, 52.0, dit_fd[seed]], 0.082,
                 config={**DIT, "model.arch": "dit", "model.patch_size": 2, "model.depth": 10}),
            _run("dit2", seed, [80.0, 55.0, 50.0, 48.0], 0.066,
                 config={**DIT, "model.arch": "dit", "model.patch_size": 2}),
            _learned(seed, [60.0, up_fd[seed]], config={**BASE, "train.init_from": "teacher/ema.safetensors"},
                     name="upcycled", steps=400, compression=compression, probe=_probe(auc, kept[0], kept[1])),
        ]
    return _sweep(rows)


def test_settings_group_runs_over_seeds_and_name_the_flop_matched_dit():
    names = {s.name: len(s.rows) for s in settings(_study().rows)}
    assert names == {"DC-DiT N=4 learned, lambda 0.03": 2, "DC-DiT N=4 random": 2, "DC-DiT N=4 grid": 2,
                     "DiT/2 FLOP-matched to N=4 (10 blocks)": 2, "DiT/2 (8 blocks)": 2, "DC-DiT N=4 upcycled": 2}


def test_every_claim_holds_with_its_numbers_and_spread_over_seeds():
    lines = study_findings(_study())
    by_claim = {line[1]: line for line in lines}
    assert set(by_claim) == set("abcdef") and len(lines) == 8  # (c) and (e) for the learned and upcycled settings
    assert by_claim["a"] == (
        "(a) DC-DiT N=4 learned, lambda 0.03: FD 35 (40, 30) at 0.08 GFLOPs/image vs DiT/2 FLOP-matched to N=4 "
        "(10 blocks): FD 47.5 (50, 45) at 0.082, at equal or lower compute. The paper's claim (DC-DiT better) holds.")
    assert "learned better than random: holds; learned better than grid: holds" in by_claim["b"]
    assert "random FD 55.5 (55, 56) (kept 0.250 (0.250, 0.250))" in by_claim["b"]
    assert ("kept fraction 22.0 (22.0, 22.0)% at the noisiest timestep -> 33.0 (33.0, 33.0)% at the cleanest (real "
            "images), clean/noisy 1.50 (1.50, 1.50); the goal >= 1.3 (the paper: 22% -> 45%, 2.0) holds.") in lines[2]
    assert by_claim["d"].endswith("The goal >= 0.75 for the learned routers holds.")
    assert "DC-DiT N=4 random 0.500 (0.500, 0.500)" in by_claim["d"]
    assert "realised compression 4.30 (4.30, 4.30) for target N=4" in by_claim["e"] and "holds" in by_claim["e"]
    assert by_claim["f"] == (
        "(f) DC-DiT N=4 upcycled after 400 steps (25% of 1600): FD 26.5 (25, 28) vs DC-DiT N=4 learned, lambda 0.03 "
        "from scratch: FD 35 (40, 30) after 1600 (90 (90, 90) after 400). Reaching the from-scratch FD in at most "
        "25% of its steps holds (the paper: 8x fewer steps).")
    assert not any(line.startswith("(diagnostics)") for line in lines)  # nothing failed: no diagnostics


def test_failing_and_undecided_claims_come_with_the_training_diagnostics():
    lines = study_findings(_study(learned_fd=(46.0, 52.0), dit_fd=(50.0, 45.0), up_fd=(60.0, 58.0),
                                  compression=6.0, kept=(0.3, 0.27), auc=0.6))
    claim = {line[1]: line for line in lines if not line.startswith("(diagnostics)")}
    assert claim["a"].endswith("The paper's claim (DC-DiT better) is not decided (the seeds overlap).")
    assert "does not hold (the other way round" in claim["f"]
    assert "clean/noisy 0.90 (0.90, 0.90)" in claim["c"] and claim["c"].endswith("does not hold.")
    assert "does not hold" in claim["e"] and "does not hold" in claim["d"]
    diagnostics = [line for line in lines if line.startswith("(diagnostics)")]
    assert ("(diagnostics) FD by step, DC-DiT N=4 learned, lambda 0.03: 90@400 -> 60@800 -> 45@1200 -> 46@1600; "
            "90@400 -> 60@800 -> 45@1200 -> 52@1600; last interval +9 (+2, +16)%: still moving.") in diagnostics
    assert ("(diagnostics) learned_seed0: natural compression 2.00@25 -> 3.90@800 -> 6.00@1600 (target 4); ratio loss "
            "1.300 -> 1.000; router gradient norm 0.04 (first half) -> 0.02 (second half); kept fraction in "
            "training, clean -> noisy: 30%, 20%.") in diagnostics


def test_the_table_has_one_row_per_setting():
    table = {row[0]: row for row in study_table(_study())}
    learned = table["DC-DiT N=4 learned, lambda 0.03"]
    assert learned[1:4] == ["2", "1600", "35 (40, 30)"]
    assert learned[4] == "-22% (-11%, -33%)"  # 45 -> 40 and 45 -> 30 over the last interval
    assert learned[7] == "4.30 (4.30, 4.30)" and learned[8] == "0.800 (0.800, 0.800)"
    assert table["DiT/2 (8 blocks)"][6:] == ["-", "-", "-"]


def test_a_sweep_that_is_no_study_has_no_claims_section():
    rows = [_learned(0, [40.0]), _run("dit2", 0, [48.0], 0.066, config={**DIT, "model.patch_size": 2})]
    assert study_findings(_sweep(rows)) == []


def test_one_seed_is_said_to_have_no_spread():
    from dcdit_platform.reports.study import compare

    assert compare([1.0, 2.0], [3.0, 4.0]) == "holds"
    assert compare([1.0], [3.0]) == "holds (one seed, no spread to judge against)"
    assert compare([5.0], [3.0]) == "does not hold (the other way round, one seed, no spread to judge against)"
    assert compare([1.0, 4.0], [3.0, 5.0]) == "is not decided (the seeds overlap)"


def test_the_report_shows_the_answers_in_a_section_of_their_own():
    from dcdit_platform.reports.contents import report_document
    from dcdit_platform.reports.findings import findings

    sweep = _study()
    facts = findings(sweep)
    assert facts["study"] == study_findings(sweep)
    titles = [section.heading for section in report_document(sweep, facts, {}).sections]
    assert titles[:2] == ["Findings", "The paper's claims at this scale"]
    no_study = _sweep([_learned(0, [40.0])])
    assert "The paper's claims at this scale" not in [s.heading for s in report_document(no_study, findings(no_study),
                                                                                       {}).sections]
