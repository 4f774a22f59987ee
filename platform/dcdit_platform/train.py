"""Training on Ray Train: the driver (`plan_run`, `run_training`) and the per-worker loop (`train_worker`).

The driver validates everything it can without Ray, opens or resumes the MLflow run, then runs a `TorchTrainer`
(DDP over gloo on CPU, NCCL on GPU) whose workers build the model, restore the latest checkpoint Ray hands back
and train. Resumption is exact and idempotent: every micro-batch seeds the global RNG from (seed, step, its
position in the global batch), the data cursor, optimizer, EMA, step, per-rank RNG states and the MLflow run id
come from the checkpoint, and steps MLflow already holds are not logged again. The same seeding makes the
result independent of how the global batch is split into workers x accumulation micro-steps.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from dcdit.checkpoint import (CHECKPOINT_DIR, capture_rng_state, find_latest_checkpoint,
                              load_checkpoint, restore_rng_state, save_checkpoint)
from dcdit.errors import DCDiTError
from dcdit.upcycle import BlockDistiller
from dcdit_platform.config import ExperimentConfig, build_config, check_run_name, default_run_name, science_diff
from dcdit_platform.raycluster import ray_session, target_address
from dcdit_platform.runs import checkpoint_name, latest_checkpoint_state, read_run_record, write_run_record
from dcdit_platform.secrets import redact, redact_config, secret_env
from dcdit_platform.tracking import PROGRESS_METRIC, Tracker, TrackingUnavailable, default_tracking_uri, flat_params

TIMESTEP_BUCKETS = 5  # kept fraction is logged per fifth of the diffusion time range


# =====================================================================================================================
# Device and precision: the one place that decides them
# =====================================================================================================================

@dataclass(frozen=True)
class Runtime:
    """Where a worker computes and in which precision."""

    device: torch.device
    precision: str  # "fp32" | "bf16"

    def autocast(self):
        """bf16 autocast for the forward pass (CUDA or CPU); the model keeps its router and de-chunk in fp32."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def select_runtime(config: ExperimentConfig, device: torch.device | None = None) -> Runtime:
    """The worker's device (the Ray-assigned GPU with use_gpu, else CPU) and CPU threads."""
    res = config.resources
    if res.use_gpu:
        if not torch.cuda.is_available():
            raise DCDiTError("resources.use_gpu is true but this worker sees no CUDA device")
        device = device if device is not None and device.type == "cuda" else torch.device("cuda", 0)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    # One intra-op pool per reserved CPU: oversubscribed workers on shared CPUs slow each other down a lot.
    torch.set_num_threads(res.torch_threads or max(1, int(res.cpus_per_worker)))
    return Runtime(device=device, precision=config.train.precision)


# =====================================================================================================================
# Building blocks of a worker
# =====================================================================================================================

def open_source(config: ExperimentConfig, storage_options: dict | None = None):
    """The dataset the reader draws from: the synthetic one, or prepared shards (local or S3)."""
    from dcdit.data import SyntheticDataset, open_dataset

    d = config.data
    if d.is_synthetic:
        return SyntheticDataset(d.num_samples, image_size=d.image_size, num_classes=d.num_classes,
                                seed=config.data_seed)
    from dcdit_platform.storage import open_storage

    storage = open_storage(d.source, storage_options)
    return open_dataset(storage.root, filesystem=storage.filesystem, name=redact(d.source))


def make_reader(config: ExperimentConfig, source, rank: int, world_size: int, cursor: dict | None):
    from dcdit.data import DataReader

    d = config.data
    return DataReader(source, batch_size=config.train.global_batch // world_size, rank=rank, world_size=world_size,
                      seed=config.data_seed, shuffle=d.shuffle, shuffle_window=d.shuffle_window,
                      prefetch=d.prefetch, cursor=cursor)


def build_student(config: ExperimentConfig, *, fresh: bool) -> nn.Module:
    """The model to train: upcycled from `train.init_from` on a fresh run, else built from the config (a resumed
    run loads its weights from the checkpoint, so the pretrained DiT is not read again)."""
    from dcdit.models import build_model

    torch.manual_seed(config.seed)  # the same initialisation on every rank
    if config.is_upcycling and fresh:
        from dcdit.upcycle import upcycle

        return upcycle(config.train.init_from, config.model, cond_adaptor=config.train.cond_adaptor).model
    return build_model(config.model)


def load_teacher(config: ExperimentConfig, device: torch.device) -> nn.Module:
    from dcdit.pretrained import load_dit

    teacher = load_dit(config.train.init_from, num_heads=config.model.num_heads)
    return teacher.to(device).eval().requires_grad_(False)


def lr_at(config: ExperimentConfig, step: int) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warm-up, then constant (the paper's schedule)."""
    t = config.train
    return t.lr * min(1.0, step / t.warmup_steps) if t.warmup_steps else t.lr


def micro_seed(seed: int, step: int, index: int) -> int:
    """Seed of micro-batch `index` (its position in the global batch) of optimizer step `step`."""
    digest = hashlib.blake2b(f"dcdit/{seed}/{step}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, over every parameter."""
    ema_params = list(ema.parameters())
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


# =====================================================================================================================
# One optimizer step
# =====================================================================================================================

# Layout of the per-step statistics vector, summed over micro-batches and ranks.
_LOSS, _DIFF, _RATIO, _DISTILL, _SAMPLES, _KEPT, _ROUTER_KEPT, _GRID, _KEPT_SQ, _NONFINITE, _BUCKETS = range(11)
_STATS = _BUCKETS + 2 * TIMESTEP_BUCKETS


@dataclass
class StepResult:
    stats: torch.Tensor  # float64 (_STATS,) on CPU, summed over the global batch
    grad_norm: float
    finite: bool
    tail_drop: float = 0.0
    target_n: float | None = None
    distilling: bool = False


def train_step(model: nn.Module, objective, optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
               x: torch.Tensor, y: torch.Tensor, *, step: int, seed: int, rank: int, world_size: int,
               grad_accum: int, grad_clip: float, runtime: Runtime, distiller: BlockDistiller | None = None,
               distill_weight: float = 0.0, num_timesteps: int = 1000) -> StepResult:
    """Forward/backward over `grad_accum` micro-batches of this rank's batch (DDP syncs on the last), statistics
    all-reduced, then, when loss and gradients are finite, clip and step. `model` is the DDP wrapper (or the
    plain model in one process); the caller updates the EMA."""
    import torch.distributed as dist

    optimizer.zero_grad(set_to_none=True)
    device = x.device
    stats = torch.zeros(_STATS, dtype=torch.float64, device=device)
    micro = x.shape[0] // grad_accum
    tail_drop, target_n = 0.0, None
    for m in range(grad_accum):
        xm, ym = x[m * micro:(m + 1) * micro], y[m * micro:(m + 1) * micro]
        sync = m == grad_accum - 1 or not hasattr(model, "no_sync")
        torch.manual_seed(micro_seed(seed, step, rank * grad_accum + m))
        with (contextlib.nullcontext() if sync else model.no_sync()):
            with runtime.autocast():
                out = objective(model, xm, ym, step)
            loss = out.loss
            distill = None
            if distiller is not None:
                distill = distiller.loss()
                loss = loss + distill_weight * distill
            (loss / grad_accum).backward()
        n = xm.shape[0]
        d = loss.detach().double()
        stats[_LOSS] += d * n
        stats[_DIFF] += out.diffusion_loss.detach().double() * n
        if out.ratio_loss is not None:
            stats[_RATIO] += out.ratio_loss.detach().double() * n
        if distill is not None:
            stats[_DISTILL] += distill.detach().double() * n
        stats[_SAMPLES] += n
        stats[_NONFINITE] += (~torch.isfinite(d)).double()
        routing = out.routing
        if routing is not None:
            kept = routing.kept.double()
            grid = routing.mask.shape[1]
            stats[_KEPT] += kept.sum()
            stats[_ROUTER_KEPT] += routing.router_mask.sum().double()
            stats[_GRID] += grid * n
            stats[_KEPT_SQ] += kept.square().sum()
            bucket = (out.timesteps.long() * TIMESTEP_BUCKETS // num_timesteps).clamp(0, TIMESTEP_BUCKETS - 1)
            stats[_BUCKETS:_BUCKETS + TIMESTEP_BUCKETS].index_add_(0, bucket, kept / grid)
            stats[_BUCKETS + TIMESTEP_BUCKETS:].index_add_(0, bucket, torch.ones_like(kept))
            tail_drop, target_n = out.tail_drop, out.target_n
    if world_size > 1:
        dist.all_reduce(stats)
    stats = stats.cpu()
    if stats[_NONFINITE] > 0:
        return StepResult(stats, float("nan"), False, tail_drop, target_n, distiller is not None)
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    grad_norm = float(norm)
    if not math.isfinite(grad_norm):
        return StepResult(stats, grad_norm, False, tail_drop, target_n, distiller is not None)
    optimizer.step()
    return StepResult(stats, grad_norm, True, tail_drop, target_n, distiller is not None)


class MetricWindow:
    """Step statistics accumulated between two logging steps, turned into the logged metrics."""

    def __init__(self, config: ExperimentConfig, macs_per_sample: Callable[[float, float, float], float]):
        self.config = config
        self.macs = macs_per_sample
        self.reset()

    def reset(self) -> None:
        self.stats = torch.zeros(_STATS, dtype=torch.float64)
        self.steps = 0
        self.grad_norm = 0.0
        self.distill_samples = 0.0
        self.started = time.perf_counter()
        self.last: StepResult | None = None

    def add(self, result: StepResult) -> None:
        self.stats += result.stats
        self.steps += 1
        self.grad_norm += result.grad_norm
        if result.distilling:
            self.distill_samples += float(result.stats[_SAMPLES])
        self.last = result

    def metrics(self, step: int) -> dict[str, float]:
        s, n = self.stats, max(float(self.stats[_SAMPLES]), 1.0)
        wall = max(time.perf_counter() - self.started, 1e-9)
        out = {"train/loss": float(s[_LOSS]) / n, "train/diffusion_loss": float(s[_DIFF]) / n,
               "optim/grad_norm": self.grad_norm / max(self.steps, 1), "optim/lr": lr_at(self.config, step),
               "perf/images_per_s": n / wall, "perf/step_time_s": wall / max(self.steps, 1)}
        model = self.config.model
        if model.arch == "dcdit":
            kept, router_kept, grid = float(s[_KEPT]), float(s[_ROUTER_KEPT]), float(s[_GRID])
            out["train/ratio_loss"] = float(s[_RATIO]) / n
            out["router/kept_fraction"] = kept / max(grid, 1.0)
            out["router/compression_natural"] = grid / max(router_kept, 1.0)
            out["router/compression_effective"] = grid / max(kept, 1.0)
            out["perf/tokens_per_s"] = kept / wall
            for b in range(TIMESTEP_BUCKETS):
                count = float(s[_BUCKETS + TIMESTEP_BUCKETS + b])
                if count:
                    lo = b * self.config.diffusion.num_timesteps // TIMESTEP_BUCKETS
                    hi = (b + 1) * self.config.diffusion.num_timesteps // TIMESTEP_BUCKETS - 1
                    out[f"router/kept_fraction_t{lo:04d}_{hi:04d}"] = float(s[_BUCKETS + b]) / count
            if self.last is not None:
                out["router/tail_drop"] = float(self.last.tail_drop)
                if self.last.target_n is not None:
                    out["router/target_n"] = float(self.last.target_n)
            macs = self.macs(n, kept, float(s[_KEPT_SQ]))
        else:
            out["perf/tokens_per_s"] = n * model.num_tokens / wall
            macs = self.macs(n, 0.0, 0.0)
        if self.distill_samples:
            out["train/distill_loss"] = float(s[_DISTILL]) / self.distill_samples
        # Training = forward + backward ~ 3 forward passes; 2 FLOPs per multiply-accumulate.
        out["perf/gflops_per_s"] = 6.0 * macs / wall / 1e9
        return out


def macs_model(config: ExperimentConfig) -> Callable[[float, float, float], float]:
    """Total forward MACs of n samples given the sum of kept tokens and of their squares (dcdit.flops, which is
    affine in the mean kept count and the mean squared count)."""
    from dcdit import flops

    if config.model.arch == "dit":
        per_sample = flops.dit_macs(config.model).total
        return lambda n, kept, kept_sq: n * per_sample
    c0 = flops.dcdit_macs(config.model, kept_tokens=[0]).total
    c1_plus_c2 = flops.dcdit_macs(config.model, kept_tokens=[1]).total - c0
    two_c1_plus_four_c2 = flops.dcdit_macs(config.model, kept_tokens=[2]).total - c0
    c2 = (two_c1_plus_four_c2 - 2 * c1_plus_c2) / 2
    c1 = c1_plus_c2 - c2
    return lambda n, kept, kept_sq: n * c0 + c1 * kept + c2 * kept_sq


# =====================================================================================================================
# Artifacts: sample grid and boundary maps from the EMA model
# =====================================================================================================================

@torch.no_grad()
def write_artifacts(ema: nn.Module, config: ExperimentConfig, step: int, runtime: Runtime, out_dir: str) -> list[str]:
    """PNGs of EMA samples (DDIM, fixed per-sample seeds) and, for DC-DiT, the router's boundary maps and the kept
    fraction along the sampling trajectory. Latent data is previewed through its first three channels."""
    from dcdit.diffusion import create_diffusion, ddim_sample, per_sample_generators
    from dcdit.viz import RoutingRecorder, boundary_maps, kept_fraction_curve, sample_grid

    lg, m = config.logging, config.model
    diffusion = create_diffusion(f"ddim{min(lg.sample_steps, config.diffusion.num_timesteps)}",
                                 num_timesteps=config.diffusion.num_timesteps, learn_sigma=m.learn_sigma)
    n = lg.sample_count
    classes = config.data.num_classes if config.data.is_synthetic else m.num_classes
    y = (torch.arange(n) % min(classes, m.num_classes)).to(runtime.device)
    generators = per_sample_generators([config.seed * 100_003 + i for i in range(n)])
    recorder = RoutingRecorder(ema)
    was_training = ema.training
    ema.eval()
    try:
        with runtime.autocast():
            samples = ddim_sample(diffusion, recorder, (n, m.in_channels, m.input_size, m.input_size), y,
                                  generator=generators, device=runtime.device)
    finally:
        ema.train(was_training)
    preview = samples.float().clamp(-1, 1)[:, :3].cpu()
    os.makedirs(out_dir, exist_ok=True)
    paths = [str(sample_grid(preview, os.path.join(out_dir, f"samples_step{step:08d}.png"), nrow=min(n, 8)))]
    if recorder.routings:
        probs = recorder.probs_over_time()
        picks = sorted({round(i * (len(recorder.timesteps) - 1) / 5) for i in range(6)})
        shown = min(n, 4)
        paths.append(str(boundary_maps(probs[picks, :shown], [recorder.timesteps[i] for i in picks],
                                       os.path.join(out_dir, f"boundary_maps_step{step:08d}.png"),
                                       images=preview[:shown])))
        paths.append(str(kept_fraction_curve(recorder.timesteps, recorder.kept_fraction(),
                                             os.path.join(out_dir, f"kept_fraction_step{step:08d}.png"),
                                             target=1.0 / m.downsample_factor)))
    return paths


# =====================================================================================================================
# Sessions: Ray Train, or one in-process worker (tests and debugging)
# =====================================================================================================================

class RaySession:
    """The worker's view of Ray Train."""

    def __init__(self):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()

    def device(self) -> torch.device | None:
        try:
            import ray.train.torch

            return ray.train.torch.get_device()
        except Exception:  # noqa: BLE001 - no GPU assigned
            return None

    def secrets(self, payload: dict) -> dict:
        import ray

        ref = payload.get("secrets")
        return ray.get(ref) if ref is not None else {}

    @contextlib.contextmanager
    def checkpoint(self) -> Iterator[str | None]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as path:
            yield path

    def report(self, metrics: dict, checkpoint_dir: str | None = None, step: int | None = None) -> None:
        import ray.train

        # Every rank passes the same name at a checkpoint step; Ray takes rank 0's and only rank 0 has files.
        kwargs = {"checkpoint_dir_name": checkpoint_name(step)} if step is not None else {}
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, **kwargs)


class LocalSession:
    """One in-process worker with Ray Train's checkpoint semantics on a local folder (tests, debugging)."""

    rank, world_size = 0, 1

    def __init__(self, run_dir: str, keep: int = 3, secrets: dict | None = None, resume_from: str | None = None):
        self.run_dir, self.keep, self._secrets = run_dir, keep, secrets or {}
        self.resume_from = resume_from  # hand back this checkpoint instead of the newest (as Ray may)
        self.reports: list[dict] = []

    def device(self) -> None:
        return None

    def secrets(self, payload: dict) -> dict:
        return self._secrets

    @contextlib.contextmanager
    def checkpoint(self) -> Iterator[str | None]:
        if self.resume_from is not None:
            yield self.resume_from
            return
        latest = find_latest_checkpoint(self.run_dir)
        yield str(latest) if latest else None

    def report(self, metrics: dict, checkpoint_dir: str | None = None, step: int | None = None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is None:
            return
        target = os.path.join(self.run_dir, checkpoint_name(step))
        shutil.copytree(checkpoint_dir, target, dirs_exist_ok=True)
        kept = sorted(p for p in os.listdir(self.run_dir) if CHECKPOINT_DIR.fullmatch(p))
        for old in kept[:-self.keep]:
            shutil.rmtree(os.path.join(self.run_dir, old), ignore_errors=True)


# =====================================================================================================================
# The worker loop
# =====================================================================================================================

def train_worker(payload: dict) -> None:
    """Ray Train's train_loop_per_worker."""
    run_worker(payload, RaySession())


def run_worker(payload: dict, session) -> None:
    """Build, restore, train to `train.steps`, checkpoint and log. Stops early (reporting `error`) on a non-finite
    loss or an unreachable tracking server, after the last good checkpoint and on every rank at the same step."""
    import torch.distributed as dist

    from dcdit.diffusion import create_diffusion
    from dcdit.objective import TrainingObjective

    entered = time.perf_counter()
    secrets = session.secrets(payload)
    for key, value in secrets.get("env", {}).items():
        os.environ.setdefault(key, value)
    config = build_config(payload["config"])
    name, rank, world = payload["name"], session.rank, session.world_size
    runtime = select_runtime(config, session.device())
    t = config.train

    with session.checkpoint() as ckpt_dir:
        ckpt = load_checkpoint(ckpt_dir) if ckpt_dir else None
    start = int(ckpt.state["step"]) if ckpt else 0
    if ckpt and ckpt.state.get("config_hash") not in (None, payload["config_hash"]):
        raise DCDiTError(f"checkpoint {ckpt_dir} was written by a run with another config "
                         f"({ckpt.state.get('config_hash')} vs {payload['config_hash']})")
    run_id = (ckpt.state.get("mlflow_run_id") if ckpt else None) or payload["run_id"]

    # Model, EMA (initialised from the model), optimizer over the trainable parameters.
    model = build_student(config, fresh=ckpt is None)
    if ckpt:
        model.load_state_dict(ckpt.model_state)
    if config.is_upcycling and t.freeze_embedders:
        from dcdit.upcycle import freeze_embedders

        freeze_embedders(model)
    model.to(runtime.device)
    ema = copy.deepcopy(model).requires_grad_(False)
    if ckpt and ckpt.ema_state is not None:
        ema.load_state_dict(ckpt.ema_state)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr_at(config, max(start, 1)), betas=tuple(t.betas), eps=t.eps,
                                  weight_decay=t.weight_decay)
    if ckpt and ckpt.optimizer_state is not None:
        optimizer.load_state_dict(ckpt.optimizer_state)
    if ckpt and str(rank) in ckpt.state.get("rng", {}):
        restore_rng_state(ckpt.state["rng"][str(rank)])
    ddp = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[runtime.device.index] if runtime.device.type == "cuda"
                                      else None)

    # Upcycling phases: steps 1..distill_steps add the teacher term, later steps are normal training. The phase
    # is a function of the step, so a resumed job continues in the phase its checkpoint was in.
    distiller = None
    if config.is_upcycling and start < t.distill_steps:
        distiller = BlockDistiller(model, load_teacher(config, runtime.device))

    diffusion = create_diffusion(num_timesteps=config.diffusion.num_timesteps, learn_sigma=config.model.learn_sigma)
    objective = TrainingObjective(diffusion, is_dcdit=config.model.arch == "dcdit",
                                  downsample_factor=config.model.downsample_factor, chunking=t.chunking,
                                  seed=config.seed)
    source = open_source(config, secrets.get("storage_options"))
    reader = make_reader(config, source, rank, world, ckpt.state.get("data_cursor") if ckpt else None)

    tracker, logged_until = None, 0
    if rank == 0:
        tracker = Tracker(secrets.get("tracking_uri") or payload["tracking_uri"],
                          retry_timeout_s=config.tracking.retry_timeout_s)
        logged_until = tracker.last_logged_step(run_id)
        # How often a worker group started this run: > 1 means Ray restarted it after a failure (or a resume).
        starts = int(tracker.get_run(run_id).data.tags.get("dcdit.worker_starts", "0")) + 1
        tracker.set_tags(run_id, {"dcdit.worker_starts": starts, "dcdit.resumed_from_step": start})
    window = MetricWindow(config, macs_model(config))
    last_metrics = dict(ckpt.state.get("metrics", {})) if ckpt else {}
    last_checkpoint = start if ckpt else None
    loop_started, loop_cpu_started = time.perf_counter(), time.process_time()

    def stop(message: str) -> None:
        if tracker is not None:
            tracker.retry_timeout_s = min(tracker.retry_timeout_s, 10.0)  # best effort: the server may be gone
            with contextlib.suppress(DCDiTError):
                tracker.set_tags(run_id, {"dcdit.error": message})
        session.report({**last_metrics, "step": last_checkpoint or 0, "error": message})

    try:
        if start >= t.steps:
            session.report({**last_metrics, "step": start, "done": True})
            return
        for step in range(start + 1, t.steps + 1):
            if distiller is not None and step > t.distill_steps:
                distiller.close()
                distiller = None
            batch = next(reader)
            x = batch.x.to(runtime.device, non_blocking=True)
            y = batch.y.to(runtime.device, non_blocking=True)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(config, step)
            result = train_step(ddp, objective, optimizer, params, x, y, step=step, seed=config.seed, rank=rank,
                                world_size=world, grad_accum=t.grad_accum, grad_clip=t.grad_clip, runtime=runtime,
                                distiller=distiller, distill_weight=t.distill_weight,
                                num_timesteps=config.diffusion.num_timesteps)
            if not result.finite:
                what = "loss" if result.stats[_NONFINITE] > 0 else "gradient norm"
                kept = f"step {last_checkpoint}" if last_checkpoint else "none yet"
                stop(f"non-finite {what} at step {step}; stopped before its optimizer step. Last good checkpoint: "
                     f"{kept}. Lower train.lr, use fp32, or check the data")
                return
            ema_update(ema, model, t.ema_decay)
            window.add(result)

            is_log = step % config.logging.every == 0 or step == t.steps
            is_ckpt = step % config.checkpoint.every == 0 or step == t.steps
            every = config.logging.artifacts_every
            is_art = every >= 0 and ((every and step % every == 0) or step == t.steps)
            metrics = None
            if is_log or is_ckpt:
                metrics = window.metrics(step)
                metrics["step"] = step
                last_metrics = metrics
            fatal = None
            if rank == 0 and step > logged_until and (is_log or is_art):
                try:
                    if is_log:
                        tracker.log_metrics(run_id, {k: v for k, v in metrics.items() if k != "step"}, step)
                        _print_progress(name, step, t.steps, metrics)
                    if is_art:
                        with tempfile.TemporaryDirectory(prefix="dcdit-art-") as tmp:
                            for path in write_artifacts(ema, config, step, runtime, tmp):
                                tracker.log_artifact(run_id, path, "samples")
                except TrackingUnavailable as err:
                    kept = f"step {last_checkpoint}" if last_checkpoint else "none yet"
                    fatal = f"{err}; stopped at step {step}. Last good checkpoint: {kept}"
            if world > 1 and (is_log or is_art):
                holder = [fatal]
                dist.broadcast_object_list(holder, src=0)
                fatal = holder[0]
            if fatal:
                stop(fatal)
                return
            if is_log:
                window.reset()
            # Ray Train's report is a barrier whose queue holds one result, drained by the controller every ~2 s
            # (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S): reporting every step would throttle training to that rate, so
            # only checkpoint steps report; step metrics go to MLflow directly from rank 0.
            if is_ckpt:
                rng = {rank: capture_rng_state()}
                if world > 1:
                    gathered: list = [None] * world
                    dist.all_gather_object(gathered, rng)
                    rng = {k: v for part in gathered for k, v in part.items()}
                metrics = {**metrics, "time/loop_s": time.perf_counter() - loop_started,
                           "time/loop_cpu_s": time.process_time() - loop_cpu_started,
                           "time/worker_setup_s": loop_started - entered}
                tmp = None
                if rank == 0:
                    tmp = tempfile.mkdtemp(prefix="dcdit-ckpt-")
                    state = {"step": step, "data_cursor": reader.cursor, "world_size": world,
                             "rng": {str(k): v for k, v in rng.items()}, "config_hash": payload["config_hash"],
                             "mlflow_run_id": run_id, "run_name": name, "images_seen": step * t.global_batch,
                             "phase": "distill" if step < t.distill_steps else "train", "metrics": metrics}
                    save_checkpoint(tmp, model_state=model.state_dict(), ema_state=ema.state_dict(),
                                    optimizer_state=optimizer.state_dict(), state=state, config=payload["config"])
                try:
                    session.report(metrics, checkpoint_dir=tmp, step=step)
                finally:
                    if tmp:
                        shutil.rmtree(tmp, ignore_errors=True)
                last_checkpoint = step
    finally:
        reader.close()
        if distiller is not None:
            distiller.close()


def _print_progress(name: str, step: int, steps: int, metrics: dict) -> None:
    parts = [f"loss {metrics['train/loss']:.4f}"]
    if "router/compression_effective" in metrics:
        parts.append(f"compression {metrics['router/compression_effective']:.2f}")
    parts += [f"grad {metrics['optim/grad_norm']:.3f}", f"{metrics['perf/images_per_s']:.1f} img/s"]
    # A logger, not print: Ray Train patches print into its logger and can echo it twice.
    logging.getLogger("dcdit.train").info("[%s] step %d/%d %s", name, step, steps, " ".join(parts))


# =====================================================================================================================
# The driver
# =====================================================================================================================

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
    from dcdit_platform.storage import open_storage

    name = check_run_name(name) if name else default_run_name(config, config_path)
    storage = open_storage(config.storage.uri, config.storage.options() or None)
    if not storage.is_local:
        storage.check()
    tracking_uri = config.tracking.uri or default_tracking_uri(storage.uri)
    _check_data(config)
    init = config.train.init_from
    # Local paths are checked here; hub names and official file names are resolved by the workers.
    if init and init.startswith((".", "/", "~")) and not os.path.exists(os.path.expanduser(init)):
        raise DCDiTError(f"train.init_from={init!r} does not exist")
    return RunPlan(config=config, name=name, storage=storage, tracking_uri=tracking_uri, config_path=config_path,
                   warnings=config.warnings())


def _check_data(config: ExperimentConfig) -> None:
    """Prepared shards must fit the model: layout, channels, size, classes."""
    if config.data.is_synthetic:
        return
    from dcdit.data import read_manifest
    from dcdit_platform.storage import open_storage

    storage = open_storage(config.data.source, config.storage.options() or None)
    manifest = read_manifest(storage.root, filesystem=storage.filesystem, name=redact(config.data.source))
    shape = tuple(manifest.shape)
    channels, size = (shape[2], shape[0]) if manifest.layout == "pixels" else (shape[0], shape[1])
    m = config.model
    if (channels, size) != (m.in_channels, m.input_size):
        raise DCDiTError(f"the dataset {redact(config.data.source)} holds {manifest.layout} of shape {shape}, so set "
                         f"model.in_channels={channels} and model.input_size={size} "
                         f"(now {m.in_channels} and {m.input_size})")
    if manifest.num_classes > m.num_classes:
        raise DCDiTError(f"the dataset has {manifest.num_classes} classes but model.num_classes={m.num_classes}")
    if manifest.num_samples < config.train.global_batch:
        raise DCDiTError(f"the dataset has {manifest.num_samples} samples, fewer than train.global_batch="
                         f"{config.train.global_batch}")


def run_training(plan: RunPlan, *, address: str | None = None, echo: Callable[[str], None] | None = None,
                 callbacks: Sequence[Any] = ()) -> dict:
    """Train (or resume) the planned run on Ray and return its summary; DCDiTError on user-fixable failures.

    `callbacks` are Ray Train `UserCallback`s added to the trainer's RunConfig (sweeps pass Tune's
    `TuneReportCallback` so that the trial's scheduler sees the reported metrics)."""
    echo = echo or (lambda text: print(text, file=sys.stderr, flush=True))
    config, name = plan.config, plan.name
    run_dir = plan.storage.child(name)
    config_dict = config.to_dict()
    safe_config = redact_config(config_dict)
    config_hash = config.config_hash()

    record = read_run_record(plan.storage, name)
    latest = latest_checkpoint_state(run_dir)
    _refuse_changed_science(name, config, record, latest)

    tracker = Tracker(plan.tracking_uri, retry_timeout_s=config.tracking.retry_timeout_s)
    known_run = (latest[1].get("mlflow_run_id") if latest else None) or (record or {}).get("mlflow_run_id")
    run_id = tracker.open_run(experiment=config.tracking.experiment, run_name=name, run_id=known_run,
                              parent_run_id=config.tracking.parent_run_id, tags=config.tracking.tags)
    tracker.log_params(run_id, flat_params(safe_config))
    tracker.set_tags(run_id, {"dcdit.config_hash": config_hash, "dcdit.storage": redact(plan.run_uri),
                              "dcdit.model": config.model_preset or config.model.arch,
                              **({"dcdit.init_from": redact(config.train.init_from)} if config.is_upcycling else {})})
    if record is None:
        import yaml

        tracker.log_text(run_id, yaml.safe_dump(safe_config, sort_keys=False), "config/resolved.yaml")
        _write_run_record(plan, run_id, safe_config)
    if latest and int(latest[1].get("step", 0)) >= config.train.steps:
        # Already trained this far: a complete checkpoint is the result, no need to start Ray for it.
        echo(f"dcdit train: {name} already reached step {latest[1]['step']} (train.steps={config.train.steps})")
        tracker.finish(run_id, "FINISHED")
        metrics = {k: v for k, v in latest[1].get("metrics", {}).items() if k != "step"}
        return {"name": name, "step": int(latest[1]["step"]), "checkpoint": plan.storage.join(name, latest[0]),
                "mlflow_run_id": run_id, "tracking_uri": plan.display_tracking_uri,
                "experiment": config.tracking.experiment, "storage": redact(plan.run_uri),
                "config_hash": config_hash, "metrics": metrics, "ray_startup_s": 0.0, "wall_s": 0.0}
    if latest:
        echo(f"dcdit train: resuming {name} from {latest[0]} (MLflow run {run_id})")
    else:
        echo(f"dcdit train: starting {name} (MLflow run {run_id}, storage {redact(plan.run_uri)})")

    t0 = time.perf_counter()
    _check_local_resources(config, address)
    # The dashboard stays on: Ray Train V2 and Tune use the State API it serves.
    with ray_session(address, dashboard=True):
        ray_startup_s = time.perf_counter() - t0
        try:
            result = _fit(plan, run_id, safe_config, config_hash, callbacks=callbacks)
        except KeyboardInterrupt:
            with contextlib.suppress(DCDiTError):
                tracker.finish(run_id, "KILLED")
            raise
        except DCDiTError:
            with contextlib.suppress(DCDiTError):
                tracker.finish(run_id, "FAILED")
            raise
    metrics = dict(result.metrics or {})
    checkpoint_uri = _checkpoint_uri(plan, result.checkpoint)
    if metrics.get("error"):
        with contextlib.suppress(DCDiTError):
            tracker.finish(run_id, "FAILED")
        raise DCDiTError(f"{metrics['error']} ({checkpoint_uri or 'no checkpoint'}; run {name})")
    tracker.finish(run_id, "FINISHED")
    step = int(metrics.pop("step", 0))
    metrics.pop("done", None)
    return {"name": name, "step": step, "checkpoint": checkpoint_uri, "mlflow_run_id": run_id,
            "tracking_uri": plan.display_tracking_uri, "experiment": config.tracking.experiment,
            "storage": redact(plan.run_uri), "config_hash": config_hash, "metrics": metrics,
            "ray_startup_s": round(ray_startup_s, 3), "wall_s": round(time.perf_counter() - t0, 3)}


def _write_run_record(plan: RunPlan, run_id: str, safe_config: dict) -> None:
    """What `dcdit resume NAME` and later resumptions need: the (redacted) config, its science and hash."""
    write_run_record(plan.storage, plan.name, {
        "name": plan.name, "config": safe_config, "science": plan.config.science_dict(),
        "config_hash": plan.config.config_hash(), "config_path": plan.config_path, "mlflow_run_id": run_id,
        "tracking_uri": plan.display_tracking_uri, "created_unix": time.time()})


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


def _check_local_resources(config: ExperimentConfig, address: str | None) -> None:
    """An embedded cluster is this machine: refuse a run whose workers cannot fit on it before starting Ray."""
    import ray

    if target_address(address) or ray.is_initialized():
        return
    res = config.resources
    cpus = os.cpu_count() or 1
    need = res.num_workers * res.cpus_per_worker
    if need > cpus:
        raise DCDiTError(f"{res.num_workers} workers x {res.cpus_per_worker:g} CPUs need {need:g} CPUs but this "
                         f"machine has {cpus}; lower resources.num_workers or resources.cpus_per_worker, or "
                         "pass --address of a larger cluster")
    if res.use_gpu:
        gpus = torch.cuda.device_count()
        if res.num_workers * res.gpus_per_worker > gpus:
            raise DCDiTError(f"{res.num_workers} workers x {res.gpus_per_worker:g} GPUs need more GPUs than the "
                             f"{gpus} this machine has; lower resources.num_workers or pass --address")


def _fit(plan: RunPlan, run_id: str, safe_config: dict, config_hash: str, callbacks: Sequence[Any] = ()):
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    config = plan.config
    res = config.resources
    secrets = {"tracking_uri": plan.tracking_uri, "storage_options": config.storage.options(), "env": secret_env()}
    payload = {"config": safe_config, "name": plan.name, "run_id": run_id, "config_hash": config_hash,
               "tracking_uri": plan.display_tracking_uri,
               # An object reference: Ray exports train_loop_config to its dashboard, the secrets stay out of it.
               "secrets": ray.put(secrets)}
    storage = plan.storage
    if storage.is_local:
        storage_path, storage_fs = storage.root, None
    else:
        storage_path, storage_fs = storage.root, storage.filesystem  # bucket/prefix without s3:// (see ray docs)
    per_worker = {"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if res.use_gpu else {})}
    trainer = TorchTrainer(
        train_worker, train_loop_config=payload,
        torch_config=TorchConfig(backend="nccl" if res.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=res.num_workers, use_gpu=res.use_gpu,
                                               resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            name=plan.name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=config.checkpoint.max_failures,
                                                   controller_failure_limit=3),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.checkpoint.keep),
            callbacks=list(callbacks) or None,
            logging_config=ray.train.LoggingConfig(log_level="WARNING")))
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise DCDiTError(_failure_message(plan, err)) from None


def _failure_message(plan: RunPlan, err: Exception) -> str:
    """One line naming the root cause of a failed fit and the last good checkpoint."""
    causes = list(getattr(err, "worker_failures", {}).items())
    root: BaseException = causes[0][1] if causes else getattr(err, "controller_failure", err)
    seen = set()
    while id(root) not in seen:
        seen.add(id(root))
        inner = getattr(root, "cause", None) or root.__cause__
        if isinstance(root, DCDiTError) or inner is None:
            break
        root = inner
    where = f"worker rank {causes[0][0]}" if causes else "the Ray Train controller"
    if isinstance(root, DCDiTError):
        detail = str(root)
    else:
        lines = [ln for ln in str(root).splitlines() if ln.strip()]
        detail = f"{type(root).__name__}: {lines[-1] if lines else ''}"
    try:
        latest = latest_checkpoint_state(plan.storage.child(plan.name))
        kept = f"last good checkpoint {plan.storage.join(plan.name, latest[0])}" if latest else "no checkpoint yet"
    except DCDiTError:
        kept = "the storage is unreachable now, so its last good checkpoint is unknown"
    return redact(f"training failed in {where} after {plan.config.checkpoint.max_failures} restart(s): "
                  f"{' '.join(detail.split())[:400]}; {kept}; fix and run `dcdit resume {plan.name}`")


def _checkpoint_uri(plan: RunPlan, checkpoint) -> str | None:
    if checkpoint is None:
        latest = latest_checkpoint_state(plan.storage.child(plan.name))
        return plan.storage.join(plan.name, latest[0]) if latest else None
    return checkpoint.path if plan.storage.is_local else f"s3://{checkpoint.path.lstrip('/')}"


# =====================================================================================================================
# In-process runs (no Ray): tests and debugging
# =====================================================================================================================

def run_local(plan: RunPlan, *, resume_from: str | None = None) -> dict:
    """Run the worker loop in this process with one worker and the same checkpoint/tracking semantics (no Ray).

    `num_workers` x `grad_accum` becomes 1 x their product, which trains the same thing (see `micro_seed`).
    `resume_from` hands the loop that checkpoint instead of the newest, as Ray Train may after a crash."""
    config = plan.config
    if config.resources.num_workers != 1:
        plan = dataclasses.replace(plan, config=config.replace(
            resources=dataclasses.replace(config.resources, num_workers=1),
            train=dataclasses.replace(config.train, grad_accum=config.train.grad_accum * config.resources.num_workers)))
        config = plan.config
    if not plan.storage.is_local:
        raise DCDiTError("in-process runs need local storage")
    run_dir = os.path.join(plan.storage.root, plan.name)
    os.makedirs(run_dir, exist_ok=True)
    safe_config = redact_config(config.to_dict())
    config_hash = config.config_hash()
    latest = latest_checkpoint_state(plan.storage.child(plan.name))
    record = read_run_record(plan.storage, plan.name)
    _refuse_changed_science(plan.name, config, record, latest)
    tracker = Tracker(plan.tracking_uri, retry_timeout_s=config.tracking.retry_timeout_s)
    run_id = tracker.open_run(experiment=config.tracking.experiment, run_name=plan.name,
                              run_id=latest[1].get("mlflow_run_id") if latest else None,
                              parent_run_id=config.tracking.parent_run_id, tags=config.tracking.tags)
    tracker.log_params(run_id, flat_params(safe_config))
    if record is None:
        _write_run_record(plan, run_id, safe_config)
    session = LocalSession(run_dir, keep=config.checkpoint.keep, resume_from=resume_from,
                           secrets={"tracking_uri": plan.tracking_uri, "storage_options": config.storage.options()})
    previous = torch.get_num_threads()
    try:
        run_worker({"config": safe_config, "name": plan.name, "run_id": run_id, "config_hash": config_hash,
                    "tracking_uri": plan.display_tracking_uri}, session)
    finally:
        torch.set_num_threads(previous)
    metrics = dict(session.reports[-1]) if session.reports else {}
    if metrics.get("error"):
        tracker.finish(run_id, "FAILED")
        raise DCDiTError(metrics["error"])
    tracker.finish(run_id, "FINISHED")
    latest = find_latest_checkpoint(run_dir)
    step = int(metrics.pop("step", 0))
    metrics.pop("done", None)
    return {"name": plan.name, "step": step, "checkpoint": str(latest) if latest else None, "mlflow_run_id": run_id,
            "tracking_uri": plan.display_tracking_uri, "metrics": metrics}


def summary_line(summary: dict) -> str:
    return json.dumps(summary, sort_keys=True, default=str)


__all__ = ["RunPlan", "plan_run", "run_training", "run_local", "train_worker", "run_worker", "train_step",
           "micro_seed", "ema_update", "BlockDistiller", "Runtime", "select_runtime", "latest_checkpoint_state",
           "read_run_record", "PROGRESS_METRIC", "checkpoint_name"]
