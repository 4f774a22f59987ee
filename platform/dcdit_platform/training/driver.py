"""The training driver: resolve a run before any work starts (`plan_run`), then train it on Ray Train
(`run_training`) or in this process (`run_local`). Both go through one set-up path (`open_run`: science check,
MLflow run opened or resumed, params and tags, run record, the checkpoint to resume from) and one ending
(training/outcome.py: the MLflow run's status and the summary, never FINISHED unless the run reached its end).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
import ray.train
import torch
import yaml
from ray.train.torch import TorchConfig, TorchTrainer

from dcdit.data import read_manifest
from dcdit.errors import DCDiTError
from dcdit.models import family_of
from dcdit_platform import console
from dcdit_platform.config import ExperimentConfig, check_run_name, default_run_name, science_diff
from dcdit_platform.config.memory import STATE_BYTES_PER_PARAM, gib, machine_memory, training_memory
from dcdit_platform.mlflow_model import log_final_model
from dcdit_platform.raycluster import ray_session, target_address
from dcdit_platform.runs import newest_checkpoint, read_run_record, write_run_record
from dcdit_platform.secrets import redact, redact_config, secret_env
from dcdit_platform.storage import open_storage
from dcdit_platform.tracking import Tracker, flat_params, resolve_tracking_uri
from dcdit_platform.training.data import check_data
from dcdit_platform.training.outcome import OutcomeBox, fail_run, failure_message, finish_run
from dcdit_platform.training.payload import WorkerPayload, WorkerSecrets
from dcdit_platform.training.periodic_eval import check_protocol
from dcdit_platform.training.sessions import LocalSession
from dcdit_platform.training.upload import recover_staged, staging_root, write_lease
from dcdit_platform.training.worker import run_worker, train_worker


@dataclass
class RunPlan:
    """Everything the driver resolved before starting Ray."""

    config: ExperimentConfig
    name: str
    storage: Any  # dcdit_platform.storage.Storage rooted at the storage URI
    tracking_uri: str  # with credentials, if any were given; never printed or logged
    config_path: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def run_uri(self) -> str:
        return self.storage.join(self.name)

    @property
    def display_tracking_uri(self) -> str:
        return redact(self.tracking_uri)


def plan_run(config: ExperimentConfig, *, name: str | None = None, config_path: str | None = None) -> RunPlan:
    """Resolve the run name, storage and tracking URI and check the data and the upcycling source (no Ray)."""
    name = check_run_name(name) if name else default_run_name(config, config_path)
    storage = open_storage(config.storage.uri, config.storage.options() or None)
    if not storage.is_local:
        storage.check()
    tracking_uri = resolve_tracking_uri(config.tracking.uri, storage.uri)
    check_data(config)
    check_protocol(config)
    init = config.train.init_from
    # Local paths are checked here; hub names and official file names are resolved by the workers.
    if init and init.startswith((".", "/", "~")) and not os.path.exists(os.path.expanduser(init)):
        raise DCDiTError(f"train.init_from={init!r} does not exist")
    return RunPlan(config=config, name=name, storage=storage, tracking_uri=tracking_uri, config_path=config_path,
                   warnings=config.warnings())


@dataclass
class OpenedRun:
    """A planned run with its MLflow run open: what the workers are sent and the summary reports."""

    plan: RunPlan
    tracker: Tracker
    run_id: str
    safe_config: dict  # the config with secrets redacted
    config_hash: str
    done: dict | None = None  # the summary, when the newest checkpoint reached train.steps already
    resume_from: str | None = None  # the verified checkpoint the workers start from
    lease: str = ""  # this start's claim on the run folder

    def payload(self, secrets: Any = None, outcome: Any = None) -> WorkerPayload:
        p = self.plan
        return WorkerPayload(config=self.safe_config, name=p.name, run_id=self.run_id, config_hash=self.config_hash,
                             tracking_uri=p.display_tracking_uri, storage_uri=p.storage.uri, lease=self.lease,
                             resume_from=self.resume_from, secrets=secrets, outcome=outcome,
                             driver=(socket.gethostname(), os.getpid()))

    def summary(self, *, step: int, checkpoint: str | None, metrics: dict, status: str = "FINISHED",
                error: str | None = None) -> dict:
        """The JSON summary of `dcdit train --json`: `status` is the MLflow run's (FINISHED, FAILED, KILLED)."""
        p = self.plan
        return {"name": p.name, "status": status, "step": step, "checkpoint": checkpoint,
                "mlflow_run_id": self.run_id, "tracking_uri": p.display_tracking_uri,
                "experiment": p.config.tracking.experiment, "storage": redact(p.run_uri),
                "config_hash": self.config_hash, "metrics": metrics, **({"error": error} if error else {})}


def open_run(plan: RunPlan, echo: Callable[[str], None]) -> OpenedRun:
    """Pick the checkpoint to resume from (the newest that verifies; newer corrupt ones are skipped with a
    warning naming them), refuse a resumption with changed science, open (or resume) the MLflow run, log its
    params and tags, write the run record on the first start and claim the run (a lease its workers carry). Says
    on `echo` whether the run starts, resumes (from which checkpoint) or is done already (then the run is closed,
    its held-back metrics logged, and `done` holds its summary)."""
    config, name = plan.config, plan.name
    safe_config, config_hash = redact_config(config.to_dict()), config.config_hash()
    record = read_run_record(plan.storage, name)
    latest = _pick_checkpoint(plan, echo)
    _refuse_changed_science(name, config, record, latest)

    tracker = Tracker(plan.tracking_uri, retry_timeout_s=config.tracking.retry_timeout_s)
    known_run = (latest[1].get("mlflow_run_id") if latest else None) or (record or {}).get("mlflow_run_id")
    run_id = tracker.open_run(experiment=config.tracking.experiment, run_name=name, run_id=known_run,
                              parent_run_id=config.tracking.parent_run_id, tags=config.tracking.tags)
    tracker.log_params(run_id, flat_params(applicable_config(config, safe_config)))
    tracker.set_tags(run_id, {"dcdit.config_hash": config_hash, "dcdit.storage": redact(plan.run_uri),
                              "dcdit.model": config.model_preset or config.model.arch,
                              **({"dcdit.init_from": redact(config.train.init_from)} if config.is_upcycling else {})})
    tracker.log_dataset(run_id, **training_dataset(config), context="training")
    if record is None:
        tracker.log_text(run_id, yaml.safe_dump(safe_config, sort_keys=False), "config/resolved.yaml")
        write_run_record(plan.storage, name, {
            "name": name, "config": safe_config, "science": config.science_dict(),
            "config_hash": config_hash, "config_path": plan.config_path, "mlflow_run_id": run_id,
            "tracking_uri": plan.display_tracking_uri, "created_unix": time.time()})
    run = OpenedRun(plan=plan, tracker=tracker, run_id=run_id, safe_config=safe_config, config_hash=config_hash,
                    resume_from=latest[0] if latest else None)
    if latest and int(latest[1].get("step", 0)) >= config.train.steps:
        # Already trained this far: a complete checkpoint is the result, no worker needs to start for it.
        echo(f"{name} already reached step {latest[1]['step']} (train.steps={config.train.steps})")
        run.done = finish_run(run, {**latest[1].get("metrics", {}), "step": int(latest[1]["step"]),
                                    "checkpoint": latest[0],
                                    "pending_metrics": len(latest[1].get("pending_metrics") or [])})
        return run
    run.lease = write_lease(plan.storage.child(name))
    if latest:
        echo(f"resuming {name} from {latest[0]} (MLflow run {run_id})")
    else:
        echo(f"starting {name} (MLflow run {run_id}, storage {redact(plan.run_uri)})")
    return run


# Optimisation settings read only when a DC-DiT is upcycled from a DiT (train.init_from).
UPCYCLING_FIELDS = ("init_from", "freeze_embedders", "cond_adaptor", "distill_steps", "distill_weight")


def applicable_config(config: ExperimentConfig, safe_config: dict) -> dict:
    """`safe_config` without what this run's architecture never reads, so that MLflow's compare view does not show a
    DiT baseline with a DC-DiT's defaults (model fields of other families, train.chunking without a router, the
    upcycling settings of a run that is not upcycled, the evaluation protocol of a run that evaluates only at
    the end)."""
    family = family_of(config.model)
    model_fields = family.fields(config.model)
    tree = {**safe_config, "model": {k: v for k, v in safe_config["model"].items() if k in model_fields}}
    train = dict(safe_config["train"])
    if not family.routed:
        train.pop("chunking", None)
    if not config.is_upcycling:
        for key in UPCYCLING_FIELDS:
            train.pop(key, None)
    tree["train"] = train
    if not config.evaluation.every:
        tree.pop("evaluation", None)
    return tree


def training_dataset(config: ExperimentConfig) -> dict:
    """The run's training data as an MLflow dataset input: a prepared dataset by its manifest's fingerprint (which
    `dcdit prepare-data` derives from every shard's content), the synthetic data by its generator's settings."""
    d = config.data
    if d.is_synthetic:
        spec = {"seed": config.data_seed, "image_size": d.image_size, "num_classes": d.num_classes,
                "num_samples": d.num_samples}
        source = "synthetic:" + ",".join(f"{k}={v}" for k, v in spec.items())
        return {"name": "synthetic", "digest": hashlib.sha256(source.encode()).hexdigest()[:16], "source": source}
    storage = open_storage(d.source, config.storage.options() or None)
    manifest = read_manifest(storage.root, filesystem=storage.filesystem, name=redact(d.source))
    digest = manifest.source.get("fingerprint") or hashlib.sha256(
        json.dumps(dataclasses.asdict(manifest), sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"name": redact(d.source).rstrip("/").rsplit("/", 1)[-1], "digest": digest, "source": redact(d.source)}


def _pick_checkpoint(plan: RunPlan, echo: Callable[[str], None]) -> tuple[str, dict] | None:
    """The newest checkpoint of the run that verifies (sizes and sha256), after uploading one a storage failure
    left on this machine and removing what killed workers left in staging; skipped ones are warned about."""
    run_dir = plan.storage.child(plan.name)
    latest, skipped = newest_checkpoint(run_dir)
    staging = staging_root(run_dir.uri, plan.name)
    newest_step = int(latest[1]["step"]) if latest else 0
    if recover_staged(run_dir, staging, newest_step, timeout_s=plan.config.checkpoint.upload_timeout_s, echo=echo):
        latest, skipped = newest_checkpoint(run_dir)
    for dirname, why in skipped:
        console.warn("train", f"skipping {dirname}, which fails its checks: {why}")
    return latest


def _refuse_changed_science(name: str, config: ExperimentConfig, record: dict | None,
                            latest: tuple[str, dict] | None) -> None:
    old_hash = (latest[1].get("config_hash") if latest else None) or (record or {}).get("config_hash")
    if old_hash is None or old_hash == config.config_hash():
        return
    changed = science_diff(record.get("science", {}), config.science_dict()) if record else []
    listed = ", ".join(changed[:8]) + (" ..." if len(changed) > 8 else "") if changed else "model/data/optimisation"
    raise DCDiTError(f"run {name} was started with a different config ({listed} changed); resuming would mix two "
                     "experiments. Revert them or start a new run with another --name (train.steps, "
                     "train.grad_accum, checkpoint.*, logging.*, resources.*, storage.* and tracking.* may change)")


# --- on Ray Train ----------------------------------------------------------------------------------------------------

def run_training(plan: RunPlan, *, address: str | None = None, echo: Callable[[str], None] | None = None,
                 callbacks: Sequence[Any] = ()) -> dict:
    """Train (or resume) the planned run on Ray and return its summary; DCDiTError on user-fixable problems found
    before training, RunFailed (a DCDiTError carrying the `--json` summary; the MLflow run is FAILED) when the run
    itself fails, KeyboardInterrupt (the MLflow run is KILLED) when interrupted.

    `echo` prints progress lines (default: `dcdit train: ...` on stderr). `callbacks` are Ray Train
    `UserCallback`s added to the trainer's RunConfig (sweeps pass Tune's `TuneReportCallback` so that the trial's
    scheduler sees the reported metrics)."""
    _check_local_resources(plan.config, address)  # before the MLflow run and the run record exist
    run = open_run(plan, echo or console.echo("train"))
    if run.done is not None:
        return {**run.done, "ray_startup_s": 0.0, "wall_s": 0.0}
    t0 = time.perf_counter()
    # The dashboard stays on: Ray Train V2 and Tune use the State API it serves.
    with ray_session(address, dashboard=True):
        ray_startup_s = time.perf_counter() - t0
        try:
            outcome = _fit(run, callbacks=callbacks)
        except KeyboardInterrupt:
            with contextlib.suppress(DCDiTError):
                run.tracker.finish(run.run_id, "KILLED")
            raise
        except DCDiTError as err:
            raise fail_run(run, str(err)) from None
    summary = finish_run(run, outcome)
    _log_model(run, summary, echo or console.echo("train"))
    return {**summary, "ray_startup_s": round(ray_startup_s, 3), "wall_s": round(time.perf_counter() - t0, 3)}


def _check_local_resources(config: ExperimentConfig, address: str | None) -> None:
    """An embedded cluster is this machine: refuse a run whose workers cannot fit on it before starting Ray."""
    if target_address(address) or ray.is_initialized():
        return
    res = config.resources
    cpus = os.cpu_count() or 1
    need = res.min_workers * res.cpus_per_worker  # an elastic run starts with its minimum when that is what fits
    if need > cpus:
        raise DCDiTError(f"{res.min_workers} workers x {res.cpus_per_worker:g} CPUs need {need:g} CPUs but this "
                         f"machine has {cpus}; lower resources.num_workers or resources.cpus_per_worker, or "
                         "pass --address of a larger cluster")
    if res.use_gpu:
        gpus = torch.cuda.device_count()
        if res.min_workers * res.gpus_per_worker > gpus:
            raise DCDiTError(f"{res.min_workers} workers x {res.gpus_per_worker:g} GPUs need more GPUs than the "
                             f"{gpus} this machine has; lower resources.num_workers or pass --address")
    _check_memory(config)


def _check_memory(config: ExperimentConfig) -> None:
    """Refuse a run whose workers cannot hold their model and one micro-batch in this machine's memory (GPU memory
    per worker with use_gpu, else RAM for all workers), saying how much they would need."""
    need = training_memory(config)
    res = config.resources
    if res.use_gpu:
        have = min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
        where, total = "GPU memory per worker", need.total
    else:
        have, where, total = machine_memory(), f"memory for {res.min_workers} worker(s)", need.total * res.min_workers
    if have is None or total <= have:
        return
    raise DCDiTError(f"the model needs about {gib(total)} of {where} but this machine has {gib(have)} "
                     f"({need.params / 1e6:,.0f}M parameters x {STATE_BYTES_PER_PARAM} bytes of weights, gradients, "
                     f"Adam and EMA = {gib(need.state)}, plus {gib(need.activations)} of activations for "
                     f"micro-batches of {need.micro_batch}); use a smaller model, raise train.grad_accum, lower "
                     "train.global_batch, or pass --address of a cluster with more memory")


def _fit(run: OpenedRun, callbacks: Sequence[Any] = ()) -> dict | None:
    """Run the workers on Ray Train; returns the outcome rank 0 left in the driver's OutcomeBox."""
    plan = run.plan
    config = plan.config
    res = config.resources
    secrets = WorkerSecrets(tracking_uri=plan.tracking_uri, storage_options=config.storage.options(),
                            env=secret_env())
    box = OutcomeBox.remote()
    # Ray exports train_loop_config to its dashboard: the secrets go as an object reference, not as values.
    payload = run.payload(secrets=ray.put(secrets), outcome=box)
    storage = plan.storage
    # Ray wants bucket/prefix without s3:// next to the filesystem (see its docs); a local path on its own.
    storage_fs = None if storage.is_local else storage.filesystem
    per_worker = {"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if res.use_gpu else {})}
    trainer = TorchTrainer(
        train_worker, train_loop_config={"payload": payload},
        torch_config=TorchConfig(backend="nccl" if res.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=res.ray_workers(), use_gpu=res.use_gpu,
                                               resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            name=plan.name, storage_path=storage.root, storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=config.checkpoint.max_failures,
                                                   controller_failure_limit=3),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.checkpoint.keep),
            callbacks=list(callbacks) or None,
            logging_config=ray.train.LoggingConfig(log_level="WARNING")))
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as err:
        starts, _ = ray.get(box.read.remote())
        raise DCDiTError(failure_message(plan, err, restarts=max(starts - 1, 0))) from None
    return ray.get(box.read.remote())[1]


# --- in this process (no Ray): tests and debugging -------------------------------------------------------------------

def run_local(plan: RunPlan, *, resume_from: str | None = None, echo: Callable[[str], None] | None = None) -> dict:
    """Run the worker loop in this process with one worker and the same checkpoint/tracking semantics (no Ray).

    `num_workers` x `grad_accum` (the largest count of an elastic range) becomes 1 x their product, which trains
    the same thing (see `train_step`).
    `resume_from` (a checkpoint of the run, by path or directory name) hands the loop that checkpoint instead of
    the driver's pick, as Ray Train's restart after a failure may."""
    config = plan.config
    workers = config.resources.max_workers
    if config.resources.num_workers != 1:
        plan = dataclasses.replace(plan, config=config.replace(
            resources=dataclasses.replace(config.resources, num_workers=1),
            train=dataclasses.replace(config.train, grad_accum=config.train.grad_accum * workers)))
        config = plan.config
    run = open_run(plan, echo or console.echo("train"))
    if run.done is not None:
        return run.done
    secrets = WorkerSecrets(tracking_uri=plan.tracking_uri, storage_options=config.storage.options())
    payload = run.payload()
    session = LocalSession(payload, keep=config.checkpoint.keep, secrets=secrets,
                           upload_timeout_s=config.checkpoint.upload_timeout_s,
                           resume_from=os.path.basename(resume_from.rstrip("/")) if resume_from else None)
    previous = torch.get_num_threads()
    try:
        run_worker(payload, session)
    except KeyboardInterrupt:
        with contextlib.suppress(DCDiTError):
            run.tracker.finish(run.run_id, "KILLED")
        raise
    finally:
        torch.set_num_threads(previous)
    summary = finish_run(run, session.outcome)
    _log_model(run, summary, echo or console.echo("train"))
    return summary


def _log_model(run: OpenedRun, summary: dict, echo: Callable[[str], None]) -> None:
    """A finished run's final EMA weights as its MLflow model (tracking.log_model), on the driver, which reads the
    final checkpoint from the storage like any other reader."""
    if run.plan.config.tracking.log_model and summary.get("checkpoint"):
        log_final_model(run.tracker, run.run_id, summary["checkpoint"], summary["step"], echo)
