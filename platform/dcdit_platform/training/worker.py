"""The training loop one worker runs: `train_worker` under Ray Train, `run_worker` under any session. It reads as
build -> restore -> for each step: batch, step, EMA, metrics, log, checkpoint; each part lives in its own module.
Resumption is exact: micro-batches are seeded by (seed, step, index), everything else comes from the checkpoint.
"""

from __future__ import annotations

from dcdit.errors import DCDiTError
from dcdit_platform.config import build_config
from dcdit_platform.training.artifacts import artifacts_due
from dcdit_platform.training.checkpointer import Checkpointer, collective, restore
from dcdit_platform.training.data import make_reader, open_source
from dcdit_platform.training.logger import StepLogger
from dcdit_platform.training.metrics import LoopClock, MetricWindow
from dcdit_platform.training.payload import WorkerPayload
from dcdit_platform.training.periodic_eval import PeriodicEvaluator, report_last
from dcdit_platform.training.runtime import select_runtime
from dcdit_platform.training.sessions import RaySession, Session
from dcdit_platform.training.state import build_train_state, start_distiller
from dcdit_platform.training.step import build_objective, ema_update, train_step
from dcdit_platform.training.upload import prune_staging


def train_worker(config: dict) -> None:
    """Ray Train's train_loop_per_worker; Ray hands over a dict, whose one entry is the typed payload."""
    payload = config["payload"]
    run_worker(payload, RaySession(payload, build_config(payload.config).checkpoint.upload_timeout_s))


def run_worker(payload: WorkerPayload, session: Session) -> None:
    """Build, restore, train to `train.steps`, checkpoint and log, then leave the outcome with the session. Stops
    early (the outcome names why) on a non-finite loss or any error a restart cannot fix (DCDiTError: storage that
    stays unwritable, a refused MLflow request, a checkpoint of another run), after the last good checkpoint and
    on every rank at the same step. A worker whose driver is gone exits without writing anything more.

    Over 60 lines on purpose: the loop's spine reads top to bottom in one piece, as DiT's train.py does."""
    clock = LoopClock()
    secrets = session.secrets(payload)
    secrets.export_env()
    config = build_config(payload.config)
    t, rank, world = config.train, session.rank, session.world_size
    stopped = {"step": 0}

    def stop(message: str, logger: StepLogger | None = None) -> None:
        if logger is not None:
            logger.record_error(message)
        if rank == 0:
            session.finish({**stopped, "error": message})

    try:
        runtime = select_runtime(config, session.device())
        ckpt = restore(session, payload, config)
    except DCDiTError as err:
        stop(str(err))
        return
    start = int(ckpt.state["step"]) if ckpt else 0
    run_id = (ckpt.state.get("mlflow_run_id") if ckpt else None) or payload.run_id
    state = build_train_state(config, ckpt, runtime, rank, world)
    distiller = start_distiller(config, state.model, start, runtime.device)
    objective = build_objective(config)
    reader = make_reader(config, open_source(config, secrets.storage_options), rank, world,
                         ckpt.state.get("data_cursor") if ckpt else None)
    window = MetricWindow(config, latest=ckpt.state.get("metrics", {}) if ckpt else None)
    checkpointer = Checkpointer(config, payload, session, run_id=run_id, clock=clock,
                                last_step=start if ckpt else None)
    stopped.update(window.latest, step=start)
    logger = None
    evals = None if rank or not config.evaluation.every else PeriodicEvaluator(
        config, name=payload.name, run_uri=session.run_storage.uri, storage_uri=payload.storage_uri,
        tracking_uri=secrets.tracking_uri or payload.tracking_uri, run_id=run_id, env=secrets.env, start=start)
    clock.start_loop()
    try:
        logger = StepLogger(config, name=payload.name, run_id=run_id, rank=rank, world_size=world, start=start,
                            tracking_uri=secrets.tracking_uri or payload.tracking_uri, staging=session.staging,
                            carried=ckpt.state.get("pending_metrics") if ckpt else None)
        collective(session, logger.connect)
        for step in range(start + 1, t.steps + 1):
            if rank == 0:
                session.stop_if_orphaned()
            if distiller is not None and step > t.distill_steps:
                distiller.close()
                distiller = None
            batch = next(reader)
            x, y = batch.x.to(runtime.device, non_blocking=True), batch.y.to(runtime.device, non_blocking=True)
            result = train_step(state, objective, x, y, step=step, config=config, runtime=runtime, rank=rank,
                                world_size=world, distiller=distiller)
            if not result.finite:
                what = "loss" if result.stats["nonfinite"] > 0 else "gradient norm"
                stop(f"non-finite {what} at step {step}; stopped before its optimizer step. Last good checkpoint: "
                     f"{checkpointer.last_good()}. Lower train.lr, use fp32, or check the data", logger)
                return
            ema_update(state.ema, state.model, t.ema_decay)
            window.add(result)

            log, save, draw = window.due(step), checkpointer.due(step), artifacts_due(config, step)
            metrics = window.metrics(step) if log or save else None
            fatal = logger.publish(step, metrics if log else None, state.ema if draw else None, runtime)
            if fatal:
                stop(f"{fatal}. Last good checkpoint: {checkpointer.last_good()}", logger)
                return
            if log:
                window.reset()
            if save:
                checkpointer.save(step, metrics, state, reader.cursor, {"pending_metrics": logger.pending()},
                                  reported=evals.report() if evals else None)
                stopped.update(metrics, step=step)
            if evals is not None:  # in the background: training goes on while the EMA weights are scored
                if save and evals.due(step):
                    evals.launch(step)
                evals.poll(step)
        if config.evaluation.every:
            stopped.update(report_last(session, evals, t.steps))
        if rank == 0:
            session.finish({**stopped, "pending_metrics": len(logger.pending()), "done": True})
    except DCDiTError as err:
        stop(f"{err}. Last good checkpoint: {checkpointer.last_good()}", logger)
    finally:
        if logger is not None:
            logger.close()
        if evals is not None:
            evals.close()
        reader.close()
        if distiller is not None:
            distiller.close()
        if rank == 0:
            prune_staging(session.staging, checkpointer.last_step or 0)
