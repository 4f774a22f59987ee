"""The analytic memory model (perf/memory.py) against measurement: the bytes autograd saves for backward in a real
training step of small DiT and DC-DiT configurations at three grid sizes, fp32 and bf16 autocast (perf/
memory_measure.py, itself checked on hand-counted cases); the state per parameter; `dcdit bench --mode memory`."""

from __future__ import annotations

import json

import pytest
import torch

from dcdit.config import preset
from dcdit.errors import DCDiTError
from dcdit.flops import calibrate_router
from dcdit.models import build_model
from dcdit_platform.cli import main
from dcdit_platform.perf.memory import MemoryQuery, memory_table, training_memory
from dcdit_platform.perf.memory_measure import count_saved_bytes, measure_step, profiled_peak

# The model counts every tensor the code saves; what it leaves out (the loss's few latent-sized tensors counted as a
# constant, the de-chunk's padding to the longest sample) stays well under this in these configurations.
TOLERANCE = 0.03


def test_saved_bytes_count_each_storage_once_and_leave_parameters_out():
    weight = torch.nn.Parameter(torch.randn(16, 8))
    x = torch.randn(4, 8)

    def forward():
        h = (x @ weight.t()).relu()  # mm saves x (4 x 8) for the weight's gradient; relu saves its output (4 x 16)
        return (h[:, :8] * h[:, 8:]).sum()  # both factors are views of relu's output: no new storage

    assert count_saved_bytes(forward, [weight]) == 4 * (4 * 8 + 4 * 16)


def test_profiled_peak_is_the_highest_total_of_live_allocations():
    def allocations():
        a = torch.empty(1000)  # 4000 bytes
        b = torch.empty(500)  # 6000 live
        del a
        c = torch.empty(2000)  # 2000 + 8000 = 10000 live: the peak
        del b, c

    assert profiled_peak(allocations) == 10_000


def _tiny(name: str, input_size: int):
    return preset(name, input_size=input_size, depth=2, hidden_size=64, num_heads=4)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("input_size", [8, 16, 32])
@pytest.mark.parametrize("name", ["DiT-S/2", "DC-DiT-S"])
def test_activation_model_matches_the_saved_tensors_of_a_training_step(name, input_size, precision, one_thread):
    config = _tiny(name, input_size)
    measured = measure_step(config, 3, precision)
    model = training_memory(config, 3, precision, device="cpu", kept_fraction=measured.kept_fraction)
    assert measured.saved > 0
    assert abs(model.activation_total / measured.saved - 1) < TOLERANCE, (model.activation_total, measured.saved)


def test_state_is_weights_gradients_adam_ema_and_ddp_buckets_per_parameter():
    config = _tiny("DC-DiT-S", 16)
    params = sum(p.numel() for p in build_model(config).parameters())
    model = training_memory(config, 2, "bf16")
    assert model.params == params
    assert model.state == {"params": 4 * params, "grads": 4 * params, "optimizer": 8 * params, "ema": 4 * params,
                           "ddp_buckets": 4 * params}
    assert "ddp_buckets" not in training_memory(config, 2, ddp=False).state
    # Activations are per sample: twice the batch, twice the bytes (up to the rounding of each part).
    assert abs(training_memory(config, 4).activation_total - 2 * training_memory(config, 2).activation_total) < 32


def test_a_peak_measured_by_the_profiler_holds_the_saved_activations(one_thread):
    # The running peak of a first step (forward, backward, AdamW) holds what the forward saved, and less than that
    # plus every gradient and AdamW moment: backward frees activations while it creates gradients.
    config = _tiny("DiT-S/2", 16)
    measured = measure_step(config, 3, "fp32", peak=True)
    params = training_memory(config, 3).params
    assert measured.saved < measured.peak < measured.saved + 12 * params


def test_bad_queries_are_refused():
    with pytest.raises(DCDiTError, match="precision must be one of"):
        training_memory(_tiny("DiT-S/2", 8), 2, "fp16")
    with pytest.raises(DCDiTError, match="multiple of 8"):
        memory_table(MemoryQuery(models=("DiT-S/2",), image_sizes=(100,)))


def test_several_image_sizes_are_for_the_memory_mode_only(capsys):
    assert main(["bench", "DiT-S/8", "--image-size", "64", "128"]) == 2
    assert "several --image-size values are for --mode memory" in capsys.readouterr().err


def test_bench_memory_prints_the_split_for_every_model_size_and_precision(capsys):
    assert main(["bench", "--mode", "memory", "DiT-XL/2", "DC-DiT-XL", "--image-size", "256", "512", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert {(r["model"], r["image_size"], r["precision"]) for r in rows} == {
        (m, s, p) for m in ("DiT-XL/2", "DC-DiT-XL") for s in (256, 512) for p in ("fp32", "bf16")}
    for r in rows:
        state = sum(r[k] for k in ("params", "grads", "optimizer", "ema", "ddp_buckets"))
        assert r["total"] == state + r["activations"] + r["weight_copies"]
        assert (r["weight_copies"] > 0) == (r["precision"] == "bf16")
    by = {(r["model"], r["image_size"], r["precision"]): r for r in rows}
    # DiT-XL/2 has 675M parameters (Peebles & Xie): 24 bytes each of state.
    assert 674e6 < by["DiT-XL/2", 256, "fp32"]["param_count"] < 676e6
    assert by["DiT-XL/2", 256, "fp32"]["params"] == 4 * by["DiT-XL/2", 256, "fp32"]["param_count"]
    # Flash-style attention saves a fixed amount per token: four times the tokens, four times the activations, less
    # the per-sample terms (conditioning, modulation), which do not grow.
    ratio = by["DiT-XL/2", 512, "bf16"]["activations"] / by["DiT-XL/2", 256, "bf16"]["activations"]
    assert 3.9 < ratio < 4


def _saved_storage_sizes(model, x, t, y) -> list[int]:
    sizes = {}

    def pack(tensor):
        sizes[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x, t, y)
    return list(sizes.values())


def test_a_dit_batch_keeps_one_adaln_modulation_per_sample_and_a_packed_batch_one_per_token():
    # The adaLN broadcast (commit 3652a93): with equal lengths each block saves the (B, 6d) modulation, never a
    # (T, 6d) copy; on DC-DiT's packed variable-length tokens the per-token copy is what the backbone keeps.
    torch.manual_seed(0)
    batch, d = 3, 64
    x, t, y = torch.randn(batch, 4, 16, 16), torch.tensor([10, 500, 900]), torch.tensor([1, 2, 3])
    dit = build_model(_tiny("DiT-S/2", 16))
    sizes = _saved_storage_sizes(dit, x, t, y)
    tokens = batch * 64
    assert sizes.count(batch * 6 * d * 4) == 2  # one per block
    assert max(sizes) < tokens * 6 * d * 4  # the largest is fc1's (T, 4d) output
    dcdit = build_model(_tiny("DC-DiT-S", 16))
    calibrate_router(dcdit, x, t, y, 0.25)
    with torch.no_grad():
        kept = int(dcdit(x, t, y, return_routing=True)[1].kept.sum())
    assert 0.2 * batch * 256 < kept < 0.3 * batch * 256
    assert _saved_storage_sizes(dcdit, x, t, y).count(kept * 6 * d * 4) == 2
