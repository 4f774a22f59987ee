"""Sweeps on real Ray clusters with a real MLflow server over HTTP: the smoke sweep killed and resumed, submitted
with `ray job submit` to a `ray start --head` cluster with token authentication, on a 2-node `cluster_utils`
cluster that loses a node mid-trial, ASHA stopping the worse of two trials, and 16 tiny trials at once.

Every sweep runs as its own `dcdit sweep` process (the driver is what gets killed), in its own MLflow experiment.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from dcdit_platform.raycluster import free_port
from helpers.services import RayHead, kill_session

REPO = Path(__file__).resolve().parents[3]
SMOKE = REPO / "experiments" / "smoke-sweep.yaml"
SMOKE_TRIALS = ["DC-DiT-tiny_N4_lam0.01", "DC-DiT-tiny_N4_lam0.1", "DiT-tiny_2"]
BIN = Path(sys.executable).parent


def cli_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
           "RAY_DISABLE_USAGE_STATS": "1"}
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


def sweep_args(sweep: Path, storage: Path, mlflow_uri: str, experiment: str, *extra: str) -> list[str]:
    return [str(BIN / "dcdit"), "sweep", str(sweep), "--storage", str(storage), "--tracking-uri", mlflow_uri,
            "-o", f"tracking.experiment={experiment}", "--json", *extra]


def last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and '"trials"' in line:
            return json.loads(line)
    raise AssertionError(f"no JSON summary in output:\n{text[-3000:]}")


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep exited ({proc.returncode}) before {what}:\n"
                                 f"{log.read_text()[-4000:] if log else ''}")
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def mlflow_runs(uri: str, experiment: str):
    """(parent run, {child run name: run}) of the experiment's single sweep, asserting one child per name."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("dcdit.kind") == "sweep"]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    names = [r.info.run_name for r in children]
    assert len(names) == len(set(names)), f"duplicate child runs: {sorted(names)}"
    assert len(runs) == 1 + len(children), "runs outside the sweep's parent/child tree"
    return client, parents[0], {r.info.run_name: r for r in children}


def checkpoint_registered(run_dir: Path) -> bool:
    """Whether Ray Train has taken a checkpoint the run reported: it lists it in the run folder's snapshot (within
    its ~2 s polling interval after the report)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    return snapshot.is_file() and "checkpoint_dir_name" in snapshot.read_text()


def check_summary(summary: dict, names: list[str], parent_id: str, storage: Path | str, sweep_name: str) -> None:
    from dcdit_platform.storage import open_storage

    assert summary["name"] == sweep_name and summary["mlflow_run_id"] == parent_id
    assert summary["status"] == "FINISHED"
    assert [t["name"] for t in summary["trials"]] == names
    root = open_storage(str(storage))
    for trial in summary["trials"]:
        assert trial["status"] == "FINISHED", trial
        assert isinstance(trial["metrics"]["train/loss"], float)
        assert isinstance(trial["overrides"], dict)
        prefix = root.join(sweep_name, trial["name"], "checkpoint_")
        assert trial["checkpoint"].startswith(prefix), (trial["checkpoint"], prefix)
        assert root.exists(trial["checkpoint"][len(root.uri):].lstrip("/") + "/MANIFEST.json")
        assert trial["mlflow_run_id"]


def check_children(client, parent, children: dict, summary: dict) -> None:
    assert parent.info.status == "FINISHED" and parent.info.run_name == summary["name"]
    assert sorted(children) == sorted(t["name"] for t in summary["trials"])
    for trial in summary["trials"]:
        run = children[trial["name"]]
        assert run.info.run_id == trial["mlflow_run_id"] and run.info.status == "FINISHED"
        assert run.data.tags["dcdit.trial"] == trial["name"] and run.data.tags["dcdit.sweep"] == summary["name"]
        history = client.get_metric_history(run.info.run_id, "train/loss")
        steps = [m.step for m in history]
        assert steps and len(steps) == len(set(steps)), f"{trial['name']}: steps logged twice: {steps}"
        assert run.data.metrics["train/loss"] == pytest.approx(trial["metrics"]["train/loss"])


# --- resume after the driver is killed ----------------------------------------------------------------------------

# Long enough that a DC-DiT trial (12 steps, then the sweep's evaluation on Ray Data and the model logging) is
# recorded while the DiT trial still trains: at 40 steps, the DiT trial won that race under load.
DIT_STEPS = 120


def test_sweep_killed_mid_way_resumes_without_rerunning_finished_trials(tmp_path, mlflow_server):
    """SIGKILL the driver once a DC-DiT trial finished and the (longer) DiT trial has a checkpoint; the same command
    with --resume keeps the finished trials' runs untouched and continues the others from their checkpoints in their
    own MLflow runs, without Tune's tuner.pkl (truncated here, as ray#58179 leaves it)."""
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"_base_: {SMOKE}\n"
                     "baselines:\n"
                     "  - model: {patch_size: 2}\n"
                     f"    overrides: {{train.steps: {DIT_STEPS}, checkpoint.every: 8, logging.every: 4}}\n")
    storage, experiment = tmp_path / "runs", f"sweep-resume-{uuid.uuid4().hex[:6]}"
    root = storage / "smoke-sweep"
    args = sweep_args(sweep, storage, mlflow_server.uri, experiment)
    log1 = tmp_path / "first.log"
    with open(log1, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=cli_env(), start_new_session=True)
    try:
        def done():
            return [n for n in SMOKE_TRIALS if (root / "_trials" / f"{n}.json").is_file()]

        def ready():
            ckpts = list((root / "DiT-tiny_2").glob("checkpoint_*/MANIFEST.json"))
            return done() and ckpts and "DiT-tiny_2" not in done()

        wait_for(ready, 420, "a finished trial and a DiT checkpoint", proc, log1)
        wait_for(lambda: checkpoint_registered(root / "DiT-tiny_2"), 120, "Ray Train taking the DiT checkpoint",
                 proc, log1)
    finally:
        kill_session(proc)  # the driver and the local Ray it started, trial processes included
    finished = done()
    assert proc.returncode == -signal.SIGKILL
    assert finished and "DiT-tiny_2" not in finished, f"the DiT trial finished before the kill: {finished}"

    client, parent, children = mlflow_runs(mlflow_server.uri, experiment)
    before = {n: (children[n].info.status, children[n].info.end_time, children[n].data.metrics,
                  [(m.step, m.value) for m in client.get_metric_history(children[n].info.run_id, "train/loss")],
                  (root / "_trials" / f"{n}.json").read_text()) for n in finished}
    assert all(b[0] == "FINISHED" for b in before.values())
    dit_run = json.loads((root / "DiT-tiny_2" / "dcdit_run.json").read_text())["mlflow_run_id"]
    assert children["DiT-tiny_2"].info.run_id == dit_run
    for pkl in root.glob("_tune-*/tuner.pkl"):
        pkl.write_bytes(b"")

    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, env=cli_env(), timeout=480)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    summary = last_json(resumed.stdout)
    assert f"{len(finished)} trial(s) already done, not re-run: {', '.join(finished)}" in resumed.stderr
    for name in finished:
        assert f"trial {name} started" not in resumed.stderr

    client, parent, children = mlflow_runs(mlflow_server.uri, experiment)
    check_summary(summary, SMOKE_TRIALS, parent.info.run_id, storage, "smoke-sweep")
    check_children(client, parent, children, summary)
    for name in finished:
        after = (children[name].info.status, children[name].info.end_time, children[name].data.metrics,
                 [(m.step, m.value) for m in client.get_metric_history(children[name].info.run_id, "train/loss")],
                 (root / "_trials" / f"{name}.json").read_text())
        assert after == before[name], f"{name} was touched by the resume"
    assert children["DiT-tiny_2"].info.run_id == dit_run
    dit = summary["trials"][2]
    assert dit["step"] == DIT_STEPS and 0 < int(dit["resumed_from"].removeprefix("checkpoint_")) < DIT_STEPS
    assert [m.step for m in client.get_metric_history(dit_run, "train/loss")] == list(range(4, DIT_STEPS + 1, 4))
    assert all("resumed_from" not in t for t in summary["trials"] if t["name"] in finished)
    assert json.loads((root / "sweep.json").read_text())["attempts"] == 2


# --- ray job submit to a `ray start --head` cluster ----------------------------------------------------------------

@pytest.fixture
def head_cluster(tmp_path, s3_server):
    """`ray start --head` with token authentication (helpers.services.RayHead); yields its address and env."""
    head = RayHead(tmp_path / "ray-head.log", cli_env()).start()
    try:
        yield head.address, head.env
    finally:
        head.stop()


def test_ray_job_submit_runs_the_smoke_sweep(tmp_path, mlflow_server, s3_server, head_cluster):
    """As the README's "Run on a cluster": `ray job submit --working-dir . -- dcdit sweep ...` with S3 storage (the
    moto server) and the MLflow server over HTTP, against a token-authenticated head."""
    address, env = head_cluster
    wrong = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], capture_output=True, text=True,
                           env={**env, "RAY_AUTH_TOKEN": "not-the-token"}, timeout=120)
    assert wrong.returncode != 0  # token authentication is on: a client without the token is refused
    storage, experiment = s3_server.uri("sweeps"), f"sweep-job-{uuid.uuid4().hex[:6]}"
    entrypoint = ["dcdit", "sweep", "experiments/smoke-sweep.yaml", "--storage", storage,
                  "--tracking-uri", mlflow_server.uri, "-o", f"tracking.experiment={experiment}", "--json"]
    done = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
                           "--entrypoint-num-cpus", "0", "--submission-id", f"sweep-{uuid.uuid4().hex[:8]}", "--",
                           *entrypoint], capture_output=True, text=True, env=env, timeout=540)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    summary = last_json(done.stdout)
    client, parent, children = mlflow_runs(mlflow_server.uri, experiment)
    check_summary(summary, SMOKE_TRIALS, parent.info.run_id, storage, "smoke-sweep")
    check_children(client, parent, children, summary)
    assert summary["max_concurrent_trials"] == 3  # 2 CPUs / (1 worker x 0.5 CPU + 0.01 for the trial's actor)


# --- two nodes, one lost mid-trial ---------------------------------------------------------------------------------

def test_two_node_cluster_runs_trials_on_both_nodes_and_survives_losing_one(tmp_path, mlflow_server, monkeypatch):
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    dashboard = free_port()
    # The cluster's processes inherit these: no token for this throwaway cluster, and the placement-group cleaner
    # asks this cluster's dashboard (not whichever other Ray runs on the machine).
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{dashboard}")
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    sweep = tmp_path / "sweep.yaml"
    # 0.9 CPU per worker: each 1-CPU node holds one trial's worker, so two trials run at once, one per node.
    # 120 steps: the trial on the second node must still be training when the node goes (an idle 2-core machine
    # runs 24 steps in about a second, less than the wait below).
    sweep.write_text(f"_base_: {SMOKE}\n"
                     "overrides: {train.steps: 120, checkpoint.every: 8, logging.every: 8, logging.sample_count: 2,"
                     " logging.sample_steps: 2}\n"
                     "resources: {num_workers: 1, cpus_per_worker: 0.9}\n")
    storage, experiment = tmp_path / "runs", f"sweep-nodes-{uuid.uuid4().hex[:6]}"
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dashboard})
    state_api = f"http://127.0.0.1:{dashboard}"
    proc = None
    try:
        node2 = cluster.add_node(num_cpus=1)
        log = tmp_path / "sweep.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(sweep_args(sweep, storage, mlflow_server.uri, experiment, "--address",
                                               cluster.address),
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=cli_env(RAY_AUTH_MODE="disabled",
                                                RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{dashboard}"))

        def workers():
            return list_actors(address=state_api, filters=[("class_name", "=", "RayTrainWorker")], detail=True,
                               limit=1000, raise_on_missing_output=False)

        def busy_on_node2():
            alive = [a for a in workers() if a.state == "ALIVE" and a.node_id == node2.node_id]
            ckpts = list((storage / "smoke-sweep").glob("*/checkpoint_*/MANIFEST.json"))
            return alive if alive and ckpts else None

        wait_for(busy_on_node2, 420, "a Train worker on the second node and a first checkpoint", proc, log)
        wait_for(lambda: any(checkpoint_registered(d) for d in (storage / "smoke-sweep").iterdir()), 120,
                 "Ray Train taking a first checkpoint", proc, log)
        cluster.add_node(num_cpus=1)  # the spare that takes over the lost node's work
        cluster.remove_node(node2, allow_graceful=False)
        proc.wait(timeout=540)
        output = log.read_text()
        assert proc.returncode == 0, output[-4000:]
        summary = last_json(output)
        client, parent, children = mlflow_runs(mlflow_server.uri, experiment)
        check_summary(summary, SMOKE_TRIALS, parent.info.run_id, storage, "smoke-sweep")
        check_children(client, parent, children, summary)
        assert summary["max_concurrent_trials"] == 2
        all_workers = workers()
        assert {cluster.head_node.node_id, node2.node_id} <= {a.node_id for a in all_workers}
        # The lost worker was replaced: more worker actors than trials were started.
        assert len(all_workers) > len(SMOKE_TRIALS)
    finally:
        if proc is not None and proc.poll() is None:
            kill_session(proc)
        cluster.shutdown()


def run_small_sweep(tmp_path: Path, mlflow_server, name: str, body: str) -> tuple[dict, str]:
    """`dcdit sweep` of the smoke sweep with `body` (YAML) on top, in an MLflow experiment of its own, stored under
    tmp_path/runs: (its JSON summary, the experiment's name)."""
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"_base_: {SMOKE}\nname: {name}\n{body}")
    experiment = f"sweep-{name}-{uuid.uuid4().hex[:6]}"
    done = subprocess.run(sweep_args(sweep, tmp_path / "runs", mlflow_server.uri, experiment), capture_output=True,
                          text=True, env=cli_env(), timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return last_json(done.stdout), experiment


# --- ASHA -----------------------------------------------------------------------------------------------------------

@pytest.mark.timeout(900)  # two trials one after the other: ~4 min on a loaded 2-core machine, 10 under load 30
def test_asha_stops_the_worse_trial_at_its_first_rung(tmp_path, mlflow_server):
    """One trial at a time, ranked by the learning rate each reports (max): the first trial is alone at every rung
    and finishes; the second reports a tenth of its learning rate at the first rung (step 1) and is below the
    rung's cut-off (the first trial's value), so ASHA stops it there."""
    body = ("overrides: {train.steps: 4, checkpoint.every: 1, logging.every: 1, logging.artifacts_every: -1,"
            " data.num_samples: 64}\n"
            "grid: {model.downsample_factor: [4], train.chunking.ratio_loss_weight: [0.03],"
            " train.lr: [0.001, 0.0001]}\n"
            "baselines: []\n"
            "max_concurrent_trials: 1\n"
            "scheduler: {type: asha, metric: optim/lr, mode: max, grace_period: 1, reduction_factor: 2}\n")
    summary, _ = run_small_sweep(tmp_path, mlflow_server, "asha", body)
    trials = {t["overrides"]["train.lr"]: t for t in summary["trials"]}
    assert trials[0.001]["status"] == "FINISHED", trials[0.001]
    assert trials[0.0001]["status"] == "STOPPED", trials[0.0001]
    assert trials[0.001]["checkpoint"].endswith("checkpoint_00000004")
    # Tune stops a trial after the report it judged, so a step may follow; the last one never does.
    assert int(trials[0.0001]["checkpoint"].rsplit("_", 1)[1]) < 4, trials[0.0001]


@pytest.mark.timeout(900)  # two trials one after the other, each evaluated once in the background
def test_asha_ranks_trials_by_eval_fd_scored_during_training(tmp_path, mlflow_server):
    """ASHA on eval/fd, which `evaluation.every` scores while a trial trains (the loss is no ranking across lambda:
    the ratio-loss term differs). One trial at a time, one rung (the evaluated step 8): the first trial is alone
    there and finishes; the second is stopped exactly when its eval/fd at step 8 is above the first's (the rung's
    cut-off with reduction factor 2: ASHA's rule, applied here to the values MLflow holds)."""
    body = ("overrides: {train.steps: 8, checkpoint.every: 8, logging.every: 1, logging.artifacts_every: -1,"
            " data.num_samples: 64, evaluation.every: 8, evaluation.num_samples: 32, evaluation.sampler: ddim,"
            " evaluation.sample_steps: 2, evaluation.batch_size: 8, evaluation.shard_size: 16,"
            " evaluation.workers: 1, evaluation.cpus_per_worker: 0.5}\n"
            "grid: {model.downsample_factor: [4], train.chunking.ratio_loss_weight: [0.03],"
            " train.lr: [0.002, 0.000000001]}\n"
            "baselines: []\n"
            "max_concurrent_trials: 1\n"
            "scheduler: {type: asha, metric: eval/fd, mode: min, reduction_factor: 2}\n")
    summary, experiment = run_small_sweep(tmp_path, mlflow_server, "asha-eval", body)
    client, _, children = mlflow_runs(mlflow_server.uri, experiment)
    first, second = summary["trials"]
    assert first["overrides"]["train.lr"] == 0.002, summary["trials"]
    fd = {t["name"]: {m.step: m.value for m in client.get_metric_history(t["mlflow_run_id"], "eval/fd")}
          for t in summary["trials"]}
    assert list(fd[first["name"]]) == [8] and list(fd[second["name"]]) == [8], fd
    assert first["status"] == "FINISHED", first
    assert second["status"] == ("STOPPED" if fd[second["name"]][8] > fd[first["name"]][8] else "FINISHED"), (fd, second)
    # Both trained to the end before their score came back; the scheduler's decision is the status, in MLflow too.
    assert children[second["name"]].info.status == ("KILLED" if second["status"] == "STOPPED" else "FINISHED")
    print(f"ASHA on eval/fd: {first['name']} {fd[first['name']][8]:.4g}, {second['name']} "
          f"{fd[second['name']][8]:.4g} -> {second['status']}")


# --- load -----------------------------------------------------------------------------------------------------------

def test_sixteen_tiny_trials_all_finish(tmp_path, mlflow_server):
    # The load is the trials' Ray processes; their own work is kept to one checkpointed step.
    body = ("overrides: {train.steps: 1, checkpoint.every: 1, logging.every: 1, logging.artifacts_every: -1,"
            " data.num_samples: 64}\n"
            "grid:\n"
            "  model.downsample_factor: [2, 4, 9, 16]\n"
            "  train.chunking.ratio_loss_weight: [0.01, 0.03, 0.1, 0.3]\n"
            "baselines: []\n"
            "resources: {num_workers: 1, cpus_per_worker: 0.3}\n")
    summary, experiment = run_small_sweep(tmp_path, mlflow_server, "load16", body)
    storage = tmp_path / "runs"
    names = [f"DC-DiT-tiny_N{n}_lam{lam}" for n in (2, 4, 9, 16) for lam in (0.01, 0.03, 0.1, 0.3)]
    client, parent, children = mlflow_runs(mlflow_server.uri, experiment)
    check_summary(summary, names, parent.info.run_id, storage, "load16")
    check_children(client, parent, children, summary)
    assert len(children) == 16
    # The sweep's local Ray has every core; a trial takes 0.3 + 0.01 CPU, and no more run at once than there are.
    assert summary["max_concurrent_trials"] == min(16, int(os.cpu_count() // 0.31))
