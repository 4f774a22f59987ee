"""`evaluate(cfg)`: one evaluation of one checkpoint, from the checkpoint to the numbers in storage and MLflow.

Actors generate class-balanced samples with per-sample seeds in fixed shards and batches and return float64
statistics per shard; the driver merges them in shard order, so the result does not depend on how many actors run
or which one computes a shard (a shard lost with its actor is recomputed, identically, once Ray restarts it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray

from dcdit.errors import DCDiTError
from dcdit.features import INCEPTION
from dcdit.generate import SamplingPlan
from dcdit_platform import console
from dcdit_platform.evaluation.actors import EvalWorker, GenerateTask, ModelSpec
from dcdit_platform.evaluation.extractors import ExtractorSpec, prepare_extractor
from dcdit_platform.evaluation.metrics import Collected, compute_metrics
from dcdit_platform.evaluation.outputs import GRID_IMAGES, PlanResult, SampleKeeper, progress_logger, publish
from dcdit_platform.evaluation.pool import ActorPool
from dcdit_platform.evaluation.progress import Progress
from dcdit_platform.evaluation.protocol import EvalConfig, protocol_record, protocol_slug, shards_of
from dcdit_platform.evaluation.references import Reference, resolve_reference
from dcdit_platform.evaluation.sources import Geometry, domain_source, evaluation_reference, generation_geometry
from dcdit_platform.raycluster import ray_session
from dcdit_platform.runs import open_checkpoint
from dcdit_platform.secrets import WorkerSecrets, secret_env
from dcdit_platform.storage import open_storage

_echo = console.echo("eval")


def evaluate(cfg: EvalConfig, *, on_event: Callable[[dict], None] | None = None,
             echo: Callable[[str], None] = _echo) -> dict:
    """Run the evaluation `cfg` describes and return its summary (also written to storage and MLflow)."""
    cfg.validate()
    started = time.perf_counter()
    ckpt = open_checkpoint(cfg.checkpoint)
    config = ckpt.config
    cfg.check_model(config.model)
    _check_sizes(cfg, config.diffusion.num_timesteps)
    storage = open_storage(cfg.storage or ckpt.storage_root or config.storage.uri, config.storage.options() or None)
    geometry = generation_geometry(config)
    ref_spec, synthetic_params = evaluation_reference(cfg.reference, config)
    # The domain classifier is trained on the synthetic data the model learned (else on a synthetic reference).
    spec, _ = prepare_extractor(cfg.extractor, cfg.weights, storage=storage,
                                domain_source=domain_source(config, ref_spec), echo=echo)
    metrics = cfg.metrics_for(spec.name)
    plans = [cfg.sampling_plan(rho, config.model, config.diffusion.num_timesteps, geometry.num_classes)
             for rho in cfg.rhos()]

    with ray_session(cfg.address, log_to_driver=False):
        workers, gpu = _actor_count(cfg, echo)
        spec = replace(spec, blob=ray.put(Path(spec.weights_path).read_bytes()) if spec.weights_path else None)
        model = ModelSpec(config.model, ray.put(ckpt.weights), geometry.vae)
        # Actors on other machines need the credentials: by object reference, never in the job's runtime_env.
        secrets = ray.put(WorkerSecrets(env=secret_env()))
        pool = ActorPool(workers, EvalWorker, (spec, model, max(1, int(cfg.cpus_per_worker)), secrets),
                         cpus=cfg.cpus_per_worker, gpus=1 if gpu else 0, max_failures=cfg.max_actor_failures,
                         on_event=on_event)
        echo(f"{workers} actor(s) on {'GPU' if gpu else 'CPU'}; checkpoint {ckpt.uri} (step {ckpt.step})")
        reference = resolve_reference(ref_spec, synthetic_params, spec, storage, pool, cfg, geometry.image_size,
                                      metrics, echo=echo)
        on_progress = progress_logger(cfg, ckpt, echo)
        runs = [_evaluate_plan(cfg, plan, pool, geometry, reference, spec, metrics, echo=echo,
                               on_progress=on_progress) for plan in plans]
    failures = pool.failures

    protocol = protocol_record(cfg, ckpt, geometry, spec, reference=reference.label,
                               reference_id=reference.reference_id, reference_cached=reference.cached)
    summary: dict[str, Any] = {**protocol, "workers": workers, "actor_failures": failures,
                               "mlflow_run_id": ckpt.mlflow_run_id, "run_name": ckpt.run_name}
    rhos = cfg.rhos()
    if len(runs) == 1:
        summary.update(runs[0].metrics)
        summary["rho"] = rhos[0]
    else:
        summary["rho"] = rhos
        summary["sweep"] = [{"rho": rho, **run.metrics} for rho, run in zip(rhos, runs)]
    summary["seconds"] = round(time.perf_counter() - started, 3)
    slug = protocol_slug(protocol, rhos)
    summary["slug"] = slug
    publish(cfg, ckpt, storage, slug, summary, runs, echo=echo)
    return summary


# Beyond these an evaluation is a typo, not a protocol (FID-50K samples 50000 images with 250 steps).
MAX_SAMPLES, MAX_BATCH, MAX_WORKERS = 10_000_000, 65_536, 10_000


def _check_sizes(cfg: EvalConfig, num_timesteps: int) -> None:
    """Refuse sizes no evaluation needs, before Ray starts (they would run for days or exhaust memory)."""
    for flag, value, high in (("--num-samples", cfg.num_samples, MAX_SAMPLES),
                              ("--reference-samples", cfg.reference_samples, MAX_SAMPLES),
                              ("--pr-reference-samples", cfg.pr_reference_samples, MAX_SAMPLES),
                              ("--batch-size", cfg.batch_size, MAX_BATCH),
                              ("--shard-size", cfg.shard_size, MAX_SAMPLES),
                              ("--workers", cfg.workers or 1, MAX_WORKERS),
                              ("--sample-steps", cfg.sample_steps, num_timesteps)):
        if value > high:
            raise DCDiTError(f"{flag}={value} is more than {high}" + (
                ", the checkpoint's diffusion steps" if flag == "--sample-steps" else "") + "; lower it")


def _actor_count(cfg: EvalConfig, echo: Callable[[str], None]) -> tuple[int, bool]:
    """(actors, whether each has a GPU): --workers, capped at what the cluster can hold."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    slots = gpus or max(1, int(resources.get("CPU", 1) // cfg.cpus_per_worker))
    workers = cfg.workers or slots
    if workers > slots:
        # More actors than the cluster can hold would wait forever; fewer give the same numbers.
        echo(f"--workers {workers} exceeds the cluster's {slots} {'GPU' if gpus else 'CPU'} slot(s); using {slots}")
        workers = slots
    return workers, bool(gpus)


def _evaluate_plan(cfg: EvalConfig, plan: SamplingPlan, pool: ActorPool, geometry: Geometry, reference: Reference,
                   spec: ExtractorSpec, metrics: set[str], *, echo: Callable[[str], None],
                   on_progress: Callable[[int, float], None] | None = None) -> PlanResult:
    """Generate the samples of one plan on the actors, merge their statistics, and compute the metrics; progress
    with an ETA on `echo` (and `on_progress`) as shards come back."""
    started = time.perf_counter()
    export = cfg.export_path(plan.rho)
    keep = []  # per-image features the metrics need
    if metrics & {"pr", "kid"} and reference.features is not None:
        keep.append("pool")
    if "is" in metrics or spec.name != INCEPTION:
        keep.append("logits")
    tasks = [GenerateTask(shard=i, start=a, stop=b, plan=plan, shape=geometry.shape, batch_size=cfg.batch_size,
                          keep=tuple(keep), count_flops=True,
                          images_below=cfg.num_samples if export else GRID_IMAGES)
             for i, (a, b) in enumerate(shards_of(cfg.num_samples, cfg.shard_size))]
    rho_text = f" rho={plan.rho}" if plan.rho is not None else ""
    echo(f"generating {cfg.num_samples} samples ({plan.sampler} {plan.steps} steps, cfg {plan.cfg_scale}"
         f"{', Lite-CFG' if plan.lite_cfg else ''}{rho_text}) in {len(tasks)} shards")
    merged = Collected()
    progress = Progress(cfg.num_samples, "samples generated and their features extracted:", echo,
                        on_update=on_progress)
    with SampleKeeper(export, cfg.num_samples, geometry.num_classes) as samples:
        for result in pool.run(tasks):
            samples.add(result.images)
            merged.add(result)
            progress.advance(tasks[result.shard].stop - tasks[result.shard].start)
        exported = samples.close()
    seconds = time.perf_counter() - started
    values = compute_metrics(merged, reference, spec, metrics, geometry.num_classes, cfg.num_samples)
    gflops = merged.flops / max(merged.flops_images, 1) / 1e9
    forwards = plan.steps * plan.forwards_per_step()
    values.update({"gflops_per_image": gflops, "gmacs_per_forward": gflops / 2 / forwards,
                   "sampling_seconds": round(seconds, 3), "samples_per_s": round(cfg.num_samples / seconds, 3)})
    if exported:
        values["export_npz"] = exported
    return PlanResult(values, samples.grid())
