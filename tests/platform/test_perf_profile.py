"""The stage profile of a training step (perf/profile.py): every op's time is charged to exactly one stage, so the
stages add up to the profiled step, and backward ops go to the stage whose forward created their autograd node."""

from __future__ import annotations

import torch
from torch import nn

from dcdit_platform.perf.profile import STAGE_LABELS, profile_step, stage_of_events, stage_ranges
from dcdit_platform.perf.speed import BenchSettings, build_case


def test_stages_of_a_tiny_dcdit_cover_its_training_step():
    torch.manual_seed(0)
    case = build_case("DC-DiT-S", "fp32", BenchSettings(models=("DC-DiT-S",), image_size=64, batch=2))
    result = profile_step(case.model, case.forward_loss, case.optimizer)
    stages = {s["stage"]: s for s in result["stages"]}
    assert {"conditioning", "embed", "encoder", "router", "packing", "backbone", "de-chunk", "plug-back", "decoder",
            "final layer", "loss", "optimizer"} <= set(stages)
    for name in ("encoder", "router", "backbone", "decoder"):  # every trained part has a backward
        assert stages[name]["backward_ms"] > 0, name
    assert stages["optimizer"]["backward_ms"] == 0
    # Self times telescope: the stages sum to the profiler's time of the range around the whole step. Tolerance
    # 0.5%: each of the ~20 rows is rounded to 0.01 ms and only the range's own edges lie outside the ops.
    assert abs(result["profiled_step_ms"] - result["step_range_ms"]) <= 0.005 * result["step_range_ms"]
    assert abs(sum(s["share"] for s in result["stages"]) - 1) < 1e-3
    # Twelve backbone blocks outweigh the packing's few gathers.
    backbone = stages["backbone"]["forward_ms"] + stages["backbone"]["backward_ms"]
    assert backbone > stages["packing"]["forward_ms"] + stages["packing"]["backward_ms"]


class _TwoStages(nn.Module):
    """An 'encoder' that only multiplies matrices and a 'decoder' that only exponentiates: each op and its gradient
    have names that say which stage they belong to."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(8, 8)
        self.decoder = _Exp()

    def forward(self, x):
        return self.decoder(self.encoder(x))


class _Exp(nn.Module):
    def forward(self, x):
        return torch.exp(x)


def test_backward_ops_are_charged_to_the_stage_of_their_forward():
    model = _TwoStages()
    x = torch.randn(4, 8)
    with torch.profiler.profile() as prof, stage_ranges(model):
        model(x).sum().backward()
    by_node = {}
    for event, stage, direction in stage_of_events(prof.events(), STAGE_LABELS):
        if event.name.startswith("autograd::engine::evaluate_function: "):
            by_node[event.name.rpartition(" ")[2], direction] = stage
        elif direction == "forward" and event.name in ("aten::addmm", "aten::exp"):
            by_node[event.name, direction] = stage
    assert by_node[("aten::addmm", "forward")] == "encoder"
    assert by_node[("aten::exp", "forward")] == "decoder"
    assert by_node[("AddmmBackward0", "backward")] == "encoder"
    assert by_node[("ExpBackward0", "backward")] == "decoder"
    assert by_node[("SumBackward0", "backward")] == "other"  # the loss outside every stage
