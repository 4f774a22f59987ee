"""Where a training step's time goes, stage by stage (encoder, router, packing, backbone, de-chunk, plug-back, decoder,
optimizer, ...): torch.profiler ranges opened by module hooks, backward ops charged to the stage whose forward op
recorded their autograd node (matching sequence numbers), every op's self time counted once.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from dcdit.models.chunking import DECHUNK_LABEL, PLUG_BACK_LABEL

# Module (by its name in the model) -> stage. DiT and DC-DiT name their parts alike (dcdit.models.dit/dcdit), so one
# table serves both: a DiT has no encoder, router or decoder and its x_embedder is the patch embedding.
MODULE_STAGES = {
    "": "model glue",  # the model's own forward: what none of its parts or gaps covers (reshapes, casts)
    "t_embedder": "conditioning", "y_embedder": "conditioning", "cond_adaptor": "conditioning",
    "x_embedder": "embed", "encoder": "encoder", "encoder_norm": "encoder",
    "residual_proj": "residual", "router": "router",
    "blocks": "backbone", "backbone_norm": "backbone",
    "decoder": "decoder", "decoder_norm": "decoder", "final_layer": "final layer",
}
# Work between two modules, which no module owns: (after module, before module, stage).
GAPS = (("router", "blocks.0", "packing"),  # tail drop, kept coordinates, the Packing, the gather, positions
        ("backbone_norm", "decoder.0", "gate"))  # around de-chunk and plug-back: the gather, STE gate, residual
STAGE_ORDER = ("conditioning", "embed", "encoder", "residual", "router", "packing", "backbone", DECHUNK_LABEL,
               PLUG_BACK_LABEL, "gate", "decoder", "final layer", "model glue", "loss", "optimizer", "other")
OPTIMIZER = "optimizer"
LOSS = "loss"
STEP = "training step"  # the range around the whole profiled step
STAGE_LABELS = set(MODULE_STAGES.values()) | {stage for _, _, stage in GAPS} | {DECHUNK_LABEL, PLUG_BACK_LABEL,
                                                                                LOSS, OPTIMIZER}
_BACKWARD_PREFIX = "autograd::engine::evaluate_function: "


class _Range:
    """A profiler range opened in one hook and closed in another."""

    def __init__(self, name: str):
        self.name, self.scope = name, None

    def open(self, *_args) -> None:
        if self.scope is None:
            self.scope = record_function(self.name)
            self.scope.__enter__()

    def close(self, *_args) -> None:
        if self.scope is not None:
            self.scope.__exit__(None, None, None)
            self.scope = None


@contextlib.contextmanager
def stage_ranges(model: nn.Module) -> Iterator[None]:
    """Within the block, every forward of a stage's modules (and each gap between two modules) is a profiler range
    named after its stage; the hooks are removed on exit."""
    handles = []
    modules = dict(model.named_modules())
    for name, module in modules.items():
        parent = name.rpartition(".")[0]
        # A ModuleList never runs itself: its entries (blocks.0, ...) carry its stage.
        stage = MODULE_STAGES.get(name) or (MODULE_STAGES.get(parent) if isinstance(modules.get(parent), nn.ModuleList)
                                            else None)
        if stage is None:
            continue
        scope = _Range(stage)
        handles.append(module.register_forward_pre_hook(scope.open))
        handles.append(module.register_forward_hook(scope.close))
    for after, before, stage in GAPS:
        if after in modules and before in modules:
            scope = _Range(stage)
            handles.append(modules[after].register_forward_hook(scope.open))
            handles.append(modules[before].register_forward_pre_hook(scope.close))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _labelled_stage(event, labels: set[str]) -> str | None:
    """The innermost stage range around `event` (itself included), or None."""
    while event is not None:
        if event.name in labels:
            return event.name
        event = event.cpu_parent
    return None


def _backward_node(event):
    """The autograd-engine event that `event` runs under, or None for forward work."""
    while event is not None:
        if event.name.startswith(_BACKWARD_PREFIX):
            return event
        event = event.cpu_parent
    return None


def stage_of_events(events, labels: set[str]) -> Iterator[tuple[object, str, str]]:
    """(event, stage, "forward" or "backward") for every profiled event.

    A forward op belongs to the innermost stage range around it; a backward op to the stage of the forward op whose
    autograd node it evaluates (matching sequence numbers). What no range covers is "other": the step's own range
    (Python between ops), zero_grad, and in the backward gradient accumulation into the leaves."""
    stage_of_sequence: dict[int, str] = {}
    for event in events:
        if event.sequence_nr >= 0 and _backward_node(event) is None:
            stage_of_sequence.setdefault(event.sequence_nr, _labelled_stage(event, labels) or "other")
    for event in events:
        node = _backward_node(event)
        if node is None:
            yield event, _labelled_stage(event, labels) or "other", "forward"
        else:
            yield event, stage_of_sequence.get(node.sequence_nr, "other"), "backward"


def attribute(events, labels: set[str]) -> dict[str, dict[str, float]]:
    """Self CPU time (microseconds of the profiled thread) per stage, split into forward and backward: every event's
    self time counted once, so the stages sum to the time of the outermost range."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: {"forward": 0.0, "backward": 0.0})
    for event, stage, direction in stage_of_events(events, labels):
        out[stage][direction] += event.self_cpu_time_total
    return dict(out)


def _train_step(model: nn.Module, forward_loss: Callable[[], torch.Tensor],
                optimizer: torch.optim.Optimizer) -> None:
    with record_function(LOSS):
        loss = forward_loss()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    with record_function(OPTIMIZER):
        optimizer.step()


def profile_step(model: nn.Module, forward_loss: Callable[[], torch.Tensor],
                 optimizer: torch.optim.Optimizer, *, warmup: int = 1) -> dict:
    """Profile one training step (forward_loss(), backward, optimizer step) after `warmup` unprofiled ones (a first
    step pays one-off allocation and dispatch costs), and return each stage's milliseconds of forward and backward
    and its share of the step. `profiled_step_ms` sums the stages; `step_range_ms` is the profiler's own time of the
    range around the whole step, which they must add up to. The profiler adds a few microseconds per op, which
    weighs most on stages made of many small ops (packing, the per-sample attention loop)."""
    for _ in range(warmup):
        _train_step(model, forward_loss, optimizer)
    with profile(activities=[ProfilerActivity.CPU]) as prof, stage_ranges(model), record_function(STEP):
        _train_step(model, forward_loss, optimizer)
    events = prof.events()
    times = attribute(events, STAGE_LABELS)
    total = sum(t["forward"] + t["backward"] for t in times.values())
    stages = []
    for stage in sorted(times, key=lambda s: STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER)):
        t = times[stage]
        stages.append({"stage": stage, "forward_ms": round(t["forward"] / 1e3, 2),
                       "backward_ms": round(t["backward"] / 1e3, 2),
                       "share": round((t["forward"] + t["backward"]) / total, 4) if total else 0.0})
    step_range = sum(e.cpu_time_total for e in events if e.name == STEP)
    return {"stages": stages, "profiled_step_ms": round(total / 1e3, 2), "step_range_ms": round(step_range / 1e3, 2)}


def format_profile(name: str, result: dict) -> str:
    lines = [(f"where {name}'s step goes (profiled step {result['profiled_step_ms']:.0f} ms of the profiled thread; "
              "'loss' is the objective around the model: noising, MSE, ratio loss; 'other' is Python between ops, "
              "zero_grad and gradient accumulation)"),
             f"  {'stage':<14} {'forward ms':>10} {'backward ms':>11} {'share':>6}"]
    for s in result["stages"]:
        lines.append(f"  {s['stage']:<14} {s['forward_ms']:>10.1f} {s['backward_ms']:>11.1f} {s['share']:>6.1%}")
    return "\n".join(lines)


__all__ = ["GAPS", "MODULE_STAGES", "STAGE_LABELS", "attribute", "format_profile", "profile_step", "stage_of_events",
           "stage_ranges"]
