"""Sweep files without Ray: schema errors with suggestions, trial naming and grid expansion, baselines (named and
derived), how many trials run at once, and the resume guards."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dcdit.errors import DCDiTError
from dcdit.models import count_params, forward_macs
from dcdit_platform.sweeps import SweepPlan, load_sweep, run_sweep
from dcdit_platform.sweeps.placement import TrialFootprint, resolve_max_concurrent, trials_that_fit
from dcdit_platform.sweeps.spec import TRIAL_CPUS
from dcdit_platform.sweeps.state import SWEEP_RECORD, SweepState, check_compatible

REPO = Path(__file__).resolve().parents[3]
EXPERIMENTS = REPO / "experiments"


def write_sweep(tmp_path: Path, body: str, experiment: Path = EXPERIMENTS / "smoke.yaml") -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(f"experiment: {experiment}\n" + textwrap.dedent(body))
    return path


def load(path: Path, tmp_path: Path, **kwargs) -> SweepPlan:
    return load_sweep(path, storage=str(tmp_path / "runs"), **kwargs)


# --- schema ----------------------------------------------------------------------------------------------------------

def test_unknown_sweep_key_is_rejected_with_a_suggestion(tmp_path):
    path = write_sweep(tmp_path, """
        grid: {train.lr: [1.0e-4]}
        shedulr: asha
    """)
    with pytest.raises(DCDiTError, match=r"unknown sweep key 'shedulr' \(did you mean 'scheduler'\?\)"):
        load(path, tmp_path)


@pytest.mark.parametrize("key,suggestion", [
    ("train.ratio_loss_weight", "train.chunking.ratio_loss_weight"),
    ("model.downsample_factr", "model.downsample_factor"),
    ("train.chunking.ratio_los_weight", "train.chunking.ratio_loss_weight"),
])
def test_bad_grid_key_names_the_config_path(tmp_path, key, suggestion):
    path = write_sweep(tmp_path, f"grid: {{{key}: [0.01, 0.1]}}\n")
    with pytest.raises(DCDiTError) as err:
        load(path, tmp_path)
    message = str(err.value)
    assert f"grid key '{key}' is not a config key (did you mean '{suggestion}'?)" in message
    assert "\n" not in message


def test_bad_grid_value_names_the_trial_and_key(tmp_path):
    path = write_sweep(tmp_path, "grid: {model.downsample_factor: [4, 0.5]}\n")
    with pytest.raises(DCDiTError, match=r"trial DC-DiT_N0.5 \(model.downsample_factor=0.5\): "
                                         r"model.downsample_factor=0.5 must be > 1"):
        load(path, tmp_path)


@pytest.mark.parametrize("body,match", [
    ("baselines: [{model: DiT-B/2, nmae: x}]", r"baselines\[0\]: unknown key 'nmae' \(did you mean 'name'\?\)"),
    ("baselines: [{derive: [flops_matched]}]", r"must be one of param_matched, flop_matched \(did you mean "
                                                r"'flop_matched'\?\)"),
    ("scheduler: {type: hyperband}", r"scheduler.type='hyperband' must be one of 'none', 'asha'"),
    ("scheduler: {type: asha, metric: eval/fid}", r"scheduler.metric='eval/fid' is scored during training only with "
                                                  r"evaluation.every > 0, which trial DC-DiT does not set"),
    ("scheduler: {type: asha, grace_priod: 2}",
     r"unknown config key 'scheduler.grace_priod' \(did you mean 'grace_period'\?\)"),
    ("grid: {train.lr: 1.0e-4}", r"grid.train.lr=0.0001 must be a non-empty list"),
    ("max_concurrent_trials: 0", r"max_concurrent_trials=0 must be >= 1"),
    ("resources: {num_wrokers: 2}", r"'resources.num_wrokers' is not a config key \(did you mean "
                                    r"'resources.num_workers'\?\)"),
    ("evaluation: {num_samples: 64, checkpoint: x}", r"evaluation.checkpoint is set by the sweep"),
    ("evaluation: {num_sample: 64}", r"unknown config key 'evaluation.num_sample' \(did you mean 'num_samples'\?\)"),
])
def test_schema_errors(tmp_path, body, match):
    path = write_sweep(tmp_path, body + "\n")
    with pytest.raises(DCDiTError, match=match):
        load(path, tmp_path)


def test_cli_prints_one_line_error_and_exits_2(tmp_path, capsys):
    from dcdit_platform.cli import main

    path = write_sweep(tmp_path, "grid: {train.ratio_loss_weight: [0.1]}\n")
    assert main(["sweep", str(path), "--storage", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dcdit sweep: error: grid key 'train.ratio_loss_weight'")


def test_cli_reports_a_bad_sweep_file_before_importing_ray_tune_or_mlflow(tmp_path):
    """The error path of `dcdit sweep` stays as quick as parsing the file (Ray Tune, Train, MLflow and the
    evaluator would add about 4 s on a 2-core machine)."""
    path = write_sweep(tmp_path, "shedulr: asha\n")
    code = ("import sys\nfrom dcdit_platform.cli import main\n"
            f"assert main(['sweep', {str(path)!r}, '--storage', {str(tmp_path / 'runs')!r}]) == 2\n"
            "print(sorted(m for m in ('ray.tune', 'ray.train', 'mlflow', 'dcdit_platform.evaluation') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert "unknown sweep key 'shedulr'" in done.stderr


# --- trials ----------------------------------------------------------------------------------------------------------

def test_paper_sweep_expands_to_readable_trials():
    plan = load_sweep(EXPERIMENTS / "imagenet256" / "sweep-dcdit-b.yaml", storage="s3://bucket/runs",
                         tracking_uri="https://mlflow.example.com")
    assert plan.name == "sweep-dcdit-b"
    assert [t.name for t in plan.trials] == [
        "DC-DiT-B_N4_lam0.01", "DC-DiT-B_N4_lam0.03", "DC-DiT-B_N4_lam0.1",
        "DC-DiT-B_N16_lam0.01", "DC-DiT-B_N16_lam0.03", "DC-DiT-B_N16_lam0.1", "DiT-B_2", "DiT-B_4"]
    by_name = {t.name: t for t in plan.trials}
    n16 = by_name["DC-DiT-B_N16_lam0.03"]
    assert n16.overrides == {"model.downsample_factor": 16, "train.chunking.ratio_loss_weight": 0.03}
    assert n16.config.model.downsample_factor == 16 and n16.config.train.chunking.ratio_loss_weight == 0.03
    assert n16.config.model.hidden_size == 768 and n16.config.train.steps == 400_000
    for name, patch in (("DiT-B_2", 2), ("DiT-B_4", 4)):
        config = by_name[name].config
        assert (config.model.arch, config.model.patch_size, config.model.depth) == ("dit", patch, 12)
        assert (config.model.input_size, config.model.in_channels) == (32, 4)  # the latent geometry is kept
        assert by_name[name].kind == "baseline"
    # Each trial is its own Train run under the sweep, tracked as a child with readable tags.
    assert n16.config.storage.uri == "s3://bucket/runs/sweep-dcdit-b"
    assert n16.config.tracking.tags["dcdit.trial"] == "DC-DiT-B_N16_lam0.03"
    assert len({t.config_hash for t in plan.trials}) == 8
    assert plan.footprint == TrialFootprint(num_workers=8, cpus_per_worker=5.0, gpus_per_worker=1.0,
                                               trial_cpus=TRIAL_CPUS)


def test_smoke_sweep_has_two_dcdit_settings_and_one_dit(tmp_path):
    plan = load(EXPERIMENTS / "smoke-sweep.yaml", tmp_path)
    assert [(t.name, t.kind) for t in plan.trials] == [
        ("DC-DiT-tiny_N4_lam0.01", "dcdit"), ("DC-DiT-tiny_N4_lam0.1", "dcdit"), ("DiT-tiny_2", "baseline")]
    dit = plan.trials[2].config
    dcdit = plan.trials[0].config
    assert dit.model.arch == "dit" and dit.model.patch_size == 2
    assert (dit.model.depth, dit.model.hidden_size, dit.model.input_size) == (2, 64, 16)
    assert dit.train.chunking == type(dit.train.chunking)()  # router losses dropped for the DiT
    assert dcdit.train.steps == 4 and dcdit.resources.num_workers == 1 and dcdit.resources.cpus_per_worker == 0.5


def test_baselines_cross_shared_grid_keys_only(tmp_path):
    path = write_sweep(tmp_path, """
        label: DC-DiT-tiny
        grid:
          model.downsample_factor: [4, 16]
          train.lr: [1.0e-3, 2.0e-4]
        labels: {train.lr: lr}
        baselines:
          - {name: DiT-tiny_2, model: {patch_size: 2}}
    """)
    names = [t.name for t in load(path, tmp_path).trials]
    assert names == ["DC-DiT-tiny_N4_lr0.001", "DC-DiT-tiny_N4_lr0.0002", "DC-DiT-tiny_N16_lr0.001",
                     "DC-DiT-tiny_N16_lr0.0002", "DiT-tiny_2_lr0.001", "DiT-tiny_2_lr0.0002"]


def test_grid_over_model_presets_names_trials_by_preset(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text((EXPERIMENTS / "imagenet256" / "base.yaml").read_text())
    path = write_sweep(tmp_path, """
        grid:
          model: [DC-DiT-S, DC-DiT-B]
          seed: [0, 1]
    """, experiment=base)
    names = [t.name for t in load(path, tmp_path).trials]
    assert names == ["DC-DiT-S_seed-0", "DC-DiT-S_seed-1", "DC-DiT-B_seed-0", "DC-DiT-B_seed-1"]


def test_derived_baselines_match_parameters_and_flops(tmp_path):
    from dcdit import flops

    base = tmp_path / "base.yaml"
    base.write_text((EXPERIMENTS / "imagenet256" / "base.yaml").read_text())
    path = write_sweep(tmp_path, """
        overrides: {model.preset: DC-DiT-B}
        grid: {model.downsample_factor: [4, 16]}
        baselines: [DiT-B/2, {derive: [param_matched, flop_matched]}]
    """, experiment=base)
    trials = {t.name: t for t in load(path, tmp_path).trials}
    assert list(trials) == ["DC-DiT-B_N4", "DC-DiT-B_N16", "DiT-B_2", "DiT-B_2_param-matched",
                            "DiT-B_2_flop-matched", "DiT-B_4_param-matched", "DiT-B_4_flop-matched"]
    pm = trials["DiT-B_2_param-matched"].config.model
    assert pm.depth == 13 and abs(count_params(pm) / 141e6 - 1) < 0.01  # v1's parameter-matched DiT-B
    for name, n in (("DiT-B_2_flop-matched", 4), ("DiT-B_4_flop-matched", 16)):
        model = trials[name].config.model
        dc = trials[f"DC-DiT-B_N{n}"].config.model
        per_block = flops.dit_macs(model.replace(depth=2)).total - flops.dit_macs(model.replace(depth=1)).total
        assert abs(flops.dit_macs(model).total - forward_macs(dc).total) <= per_block / 2
    assert trials["DiT-B_4_flop-matched"].tree["tracking"]["tags"]["dcdit.baseline"] == \
        "flop_matched to DC-DiT N=16"


def test_baselines_drop_the_router_keys_only_when_they_have_no_router(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text((EXPERIMENTS / "imagenet256" / "base.yaml").read_text())
    path = write_sweep(tmp_path, """
        overrides: {model.preset: DC-DiT-B, train.chunking.ratio_loss_weight: 0.05}
        baselines: [DiT-B/2, {name: DC-DiT-S-ref, model: DC-DiT-S}]
    """, experiment=base)
    trials = {t.name: t for t in load(path, tmp_path).trials}
    assert trials["DiT-B_2"].config.train.chunking == type(trials["DiT-B_2"].config.train.chunking)()
    assert trials["DC-DiT-S-ref"].config.model.arch == "dcdit"
    assert trials["DC-DiT-S-ref"].config.train.chunking.ratio_loss_weight == 0.05


def test_duplicate_trials_are_refused(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text((EXPERIMENTS / "imagenet256" / "base.yaml").read_text())
    path = write_sweep(tmp_path, """
        overrides: {model.preset: DC-DiT-B}
        baselines: [DiT-B/2, {name: other, model: DiT-B/2}]
    """, experiment=base)
    with pytest.raises(DCDiTError, match="trials DiT-B_2 and other train the same config"):
        load(path, tmp_path)
    path = write_sweep(tmp_path, "grid: {train.lr: [0.1, 0.10000001]}\nlabels: {train.lr: lr}\n")
    with pytest.raises(DCDiTError, match="two trials would both be named DC-DiT_lr0.1"):
        load(path, tmp_path)


def test_every_shipped_sweep_file_validates():
    files = sorted(EXPERIMENTS.rglob("*sweep*.yaml"))
    assert len(files) >= 3
    for path in files:
        plan = load_sweep(path, storage="s3://bucket/runs", tracking_uri="https://mlflow.example.com")
        assert plan.trials
    job = (REPO / "cluster" / "kuberay" / "rayjob-sweep.yaml").read_text()
    assert "experiments/imagenet256/sweep-dcdit-b.yaml" in job
    assert (REPO / "experiments" / "imagenet256" / "sweep-dcdit-b.yaml").is_file()


# --- concurrency ---------------------------------------------------------------------------------------------------

def test_concurrency_is_derived_from_the_resources():
    fp = TrialFootprint(num_workers=1, cpus_per_worker=0.5, gpus_per_worker=0.0, trial_cpus=0.01)
    assert trials_that_fit([{"CPU": 2.0}], fp, 16) == 3
    assert resolve_max_concurrent(None, [{"CPU": 2.0}], fp, 16, local=True) == (3, None)
    assert resolve_max_concurrent(None, [{"CPU": 2.0}], fp, 2, local=True) == (2, None)
    count, warning = resolve_max_concurrent(8, [{"CPU": 2.0}], fp, 16, local=True)
    assert count == 3 and "max_concurrent_trials=8 capped to 3" in warning
    # The starving case of the reference notes: 2 CPUs, 1 CPU per worker, the trial actor holding one more.
    fp1 = TrialFootprint(num_workers=1, cpus_per_worker=1.0, gpus_per_worker=0.0, trial_cpus=1.0)
    assert trials_that_fit([{"CPU": 2.0}], fp1, 2) == 1
    # GPU nodes (KubeRay: a 0-CPU head, 48-CPU 8-GPU workers): 8 workers x (5 CPU + 1 GPU) per trial fill one
    # node each. With 6 CPUs per worker a node is full and the fourth trial's own actor has no CPU left anywhere.
    nodes = [{"CPU": 0.0}] + [{"CPU": 48.0, "GPU": 8.0}] * 4
    gpu = TrialFootprint(num_workers=8, cpus_per_worker=5.0, gpus_per_worker=1.0, trial_cpus=0.01)
    assert trials_that_fit(nodes, gpu, 8) == 4
    full = TrialFootprint(num_workers=8, cpus_per_worker=6.0, gpus_per_worker=1.0, trial_cpus=0.01)
    assert trials_that_fit(nodes, full, 8) == 3
    two_workers = TrialFootprint(num_workers=2, cpus_per_worker=1.0, gpus_per_worker=0.0, trial_cpus=0.01)
    assert trials_that_fit([{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 1.0}], two_workers, 5) == 1


def test_a_trial_that_cannot_fit_is_an_error_locally_and_waits_for_autoscaling_remotely():
    fp = TrialFootprint(num_workers=4, cpus_per_worker=1.0, gpus_per_worker=0.0, trial_cpus=0.01)
    with pytest.raises(DCDiTError, match="one trial needs CPU 4.01 .* this machine has 2 CPUs"):
        resolve_max_concurrent(None, [{"CPU": 2.0}], fp, 3, local=True)
    count, warning = resolve_max_concurrent(None, [{"CPU": 2.0}], fp, 3, local=False)
    assert count == 1 and "autoscaler" in warning
    # A cluster that grows on demand: the sweep asks for what it wants, Ray's autoscaler adds the nodes.
    assert resolve_max_concurrent(8, [{"CPU": 2.0}], fp, 3, local=False, autoscaling=True) == (3, None)


def test_concurrency_edge_cases():
    fp = TrialFootprint(num_workers=1, cpus_per_worker=0.5, gpus_per_worker=0.0, trial_cpus=0.01)
    # A request below what fits stands; with no trial left Tune still gets a valid limit of one.
    assert resolve_max_concurrent(2, [{"CPU": 2.0}], fp, 16, local=True) == (2, None)
    assert resolve_max_concurrent(None, [{"CPU": 2.0}], fp, 0, local=True) == (1, None)
    # Autoscaling means a remote cluster: a local Ray gets no nodes added, so what fits decides there.
    count, warning = resolve_max_concurrent(8, [{"CPU": 2.0}], fp, 16, local=True, autoscaling=True)
    assert count == 3 and "capped to 3" in warning
    assert resolve_max_concurrent(None, [{"CPU": 2.0}], fp, 5, local=False, autoscaling=True) == (5, None)
    # GPU workers need GPU nodes; the error sums every bundle of one trial.
    gpu = TrialFootprint(num_workers=2, cpus_per_worker=4.0, gpus_per_worker=1.0, trial_cpus=0.01)
    assert gpu.total() == pytest.approx({"CPU": 8.01, "GPU": 2.0})
    assert trials_that_fit([{"CPU": 64.0}], gpu, 4) == 0
    assert trials_that_fit([{"CPU": 64.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}], gpu, 4) == 0  # worker 2 lacks CPU
    assert trials_that_fit([{"CPU": 64.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}], gpu, 4) == 1
    with pytest.raises(DCDiTError, match=r"one trial needs CPU 8.01, GPU 2 \(2 worker\(s\) x 4 CPU \+ 0.01 for the "
                                         r"trial\) but this machine has 64 CPUs"):
        resolve_max_concurrent(None, [{"CPU": 64.0}], gpu, 1, local=True)


# --- resume guards -------------------------------------------------------------------------------------------------

def test_an_existing_sweep_needs_resume_and_the_same_trials(tmp_path):
    path = EXPERIMENTS / "smoke-sweep.yaml"
    plan = load(path, tmp_path)
    state = SweepState(plan.sweep_storage)
    trials = [{"name": t.name, "config_hash": t.config_hash} for t in plan.trials]
    state.write_sweep({"name": plan.name, "trials": trials})
    with pytest.raises(DCDiTError, match="sweep smoke-sweep already exists .* pass --resume"):
        run_sweep(plan, resume=False)
    # More steps and other resources are fine on resume; another lambda is another experiment.
    assert check_compatible(load(path, tmp_path, overrides=["train.steps=8"]), {"trials": trials}) == []
    changed = load(path, tmp_path, overrides=["train.lr=0.5"])
    with pytest.raises(DCDiTError, match=r"started with other trials \(changed: DC-DiT-tiny_N4_lam0.01, "
                                         r"DC-DiT-tiny_N4_lam0.1, DiT-tiny_2\)"):
        check_compatible(changed, {"trials": trials})
    added = check_compatible(plan, {"trials": trials[:2]})
    assert added == ["DiT-tiny_2"]
    record = json.loads((Path(plan.sweep_storage.root) / SWEEP_RECORD).read_text())
    assert record["name"] == "smoke-sweep"
