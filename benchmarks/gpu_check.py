"""What only a GPU can check, in one command of under 5 minutes (issue 14, item 5): the device's bf16 matmul rate,
packed attention by SDPA (nested tensors) and flash-attn varlen equal to an fp32 reference within bf16 tolerance,
bf16 autocast training steps of DiT-S/2 and DC-DiT-S with each attention path and their FLOP rates against the
device's bf16 peak, a 1-GPU `dcdit train` of experiments/smoke.yaml over NCCL, and sampling throughput; one table.
Without CUDA it says so and exits 0.

    .venv/bin/python benchmarks/gpu_check.py [--batch 32] [--json]
    .venv/bin/python benchmarks/gpu_check.py --device cpu --image-size 64 --batch 2   # dry run of the logic on CPU

Exit status: 0 when every check passed or was skipped (flash-attn not installed), 1 when one failed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dcdit.config import preset
from dcdit.flops import calibrate_router
from dcdit.generate import SamplingPlan, generate
from dcdit.models import build_model, family_of
from dcdit.models.attention import Packing, attention_backend, packed_attention
from dcdit_platform.perf.speed import BenchSettings, build_case

ROOT = Path(__file__).resolve().parents[1]
# Dense bf16 tensor-core peaks from the vendor's data sheets (TFLOP/s, no sparsity), by device-name substring.
NOMINAL_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0,
                       "A100": 312.0}
# bf16 keeps 8 significant bits (relative rounding 2^-9): bf16 probabilities and outputs of a softmax-weighted mean
# of unit-variance values err by a few 1e-3 at these lengths; 2e-2 absolute leaves room, and a wrong mask or a
# sample attending across the packing boundary errs by O(1).
ATTENTION_TOLERANCE = 2e-2
TRAIN_TIMEOUT_S = 240


def _flash_attn_version() -> str | None:
    try:
        import flash_attn
    except ImportError:
        return None
    return getattr(flash_attn, "__version__", "installed")


def _timed(fn, device: torch.device, calls: int) -> float:
    """Median seconds of `calls` calls of fn, synchronising the device around each."""
    times = []
    for _ in range(calls):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _row(check: str, ok: bool | None, value: str, detail: str = "") -> dict:
    return {"check": check, "result": "skipped" if ok is None else "ok" if ok else "FAIL", "value": value,
            "detail": detail}


def check_matmul(device: torch.device, size: int) -> tuple[dict, float]:
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    a @ b
    seconds = _timed(lambda: a @ b, device, 10)
    rate = 2 * size**3 / seconds / 1e12
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    nominal = next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in name), None)
    detail = f"{name}; data-sheet dense bf16 peak {nominal:g} TFLOP/s" if nominal else f"{name}; no data-sheet peak"
    return _row("bf16 matmul rate", True, f"{rate:.1f} TFLOP/s", detail), nominal or rate


def check_attention(device: torch.device) -> list[dict]:
    """Each CUDA packed-attention path against the fp32 per-sample loop, forward and input gradients."""
    lengths = [250, 64, 1, 180, 256, 17]  # ragged, with a one-token sample
    packing = Packing.from_lengths(lengths, device=device)
    gen = torch.Generator().manual_seed(0)
    # Inputs representable in bf16, so the fp32 reference sees the very numbers the bf16 paths see and the
    # comparison measures the paths' arithmetic, not the rounding of their inputs.
    q, k, v = (torch.randn(sum(lengths), 6, 64, generator=gen).bfloat16().float().to(device) for _ in range(3))
    grad = torch.randn(sum(lengths), 6, 64, generator=gen).to(device)

    def run(backend: str, dtype: torch.dtype):
        leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (q, k, v)]
        out = packed_attention(*leaves, packing, backend=backend)
        out.backward(grad.to(dtype))
        return out.float(), [t.grad.float() for t in leaves]

    ref_out, ref_grads = run("loop", torch.float32)
    rows = []
    backends = ["nested", "flash"] if device.type == "cuda" else ["loop"]
    for backend in backends:
        if backend == "flash" and _flash_attn_version() is None:
            rows.append(_row("attention flash bf16 = fp32", None, "", "flash-attn not installed"))
            continue
        out, grads = run(backend, torch.bfloat16)
        err = (out - ref_out).abs().max().item()
        grad_err = max(((g - r).abs().max() / r.abs().max()).item() for g, r in zip(grads, ref_grads, strict=True))
        ok = err <= ATTENTION_TOLERANCE and grad_err <= 2 * ATTENTION_TOLERANCE
        rows.append(_row(f"attention {backend} bf16 = fp32", ok, f"max |err| {err:.2e}",
                         f"grads max rel err {grad_err:.2e}; tolerance {ATTENTION_TOLERANCE:g} "
                         f"(grads {2 * ATTENTION_TOLERANCE:g}); lengths {lengths}"))
    return rows


def check_training(device: torch.device, args, peak_tflops: float) -> list[dict]:
    """bf16 autocast steps (forward, backward, AdamW) per model and attention path, with their FLOP rates."""
    rows = []
    backends = ["nested", "flash"] if device.type == "cuda" else ["loop"]
    settings = BenchSettings(models=("DiT-S/2", "DC-DiT-S"), image_size=args.image_size, batch=args.batch,
                             device=str(device))
    for name in settings.models:
        # A DiT batch has equal lengths and always takes one batched SDPA call: one row is enough.
        for backend in backends if family_of(preset(name)).routed else backends[:1]:
            label = f"train bf16 {name}" + (f" ({backend})" if family_of(preset(name)).routed else " (SDPA)")
            if backend == "flash" and _flash_attn_version() is None:
                rows.append(_row(label, None, "", "flash-attn not installed"))
                continue
            rows.append(_guarded(label, lambda name=name, backend=backend, label=label: _train_row(
                name, backend, label, settings, device, args, peak_tflops)))
    return rows


def _train_row(name: str, backend: str, label: str, settings: BenchSettings, device: torch.device, args,
               peak_tflops: float) -> dict:
    with attention_backend(backend):
        case = build_case(name, "bf16", settings)
        for _ in range(3):
            case.step()
        seconds = _timed(case.step, device, args.train_steps)
        loss = case.forward_loss().detach().item()
    rate = case.flops_per_step / seconds / 1e12
    return _row(label, bool(np.isfinite(loss)), f"{rate:.1f} TFLOP/s",
                f"{seconds * 1e3:.1f} ms/step at batch {args.batch}, {rate / peak_tflops:.1%} of bf16 peak, "
                f"loss {loss:.4f}")


def _guarded(check: str, make_row) -> dict:
    """The row `make_row` returns, or a FAIL row naming the exception, so that one failing check (never run on a
    GPU before) does not hide the others."""
    try:
        return make_row()
    except Exception as err:  # noqa: BLE001 - any failure is a result to print
        return _row(check, False, "", f"{type(err).__name__}: {str(err).strip()[:240]}")


def check_smoke_training(device: torch.device) -> dict:
    """`dcdit train experiments/smoke.yaml` on one GPU: Ray Train's TorchConfig picks NCCL when use_gpu."""
    if device.type != "cuda":
        return _row("dcdit train smoke, 1 GPU, NCCL", None, "", "needs CUDA")
    with tempfile.TemporaryDirectory() as storage:
        cmd = [sys.executable, "-m", "dcdit_platform.cli", "train", str(ROOT / "experiments" / "smoke.yaml"),
               "--name", "gpu-check", "--storage", storage, "-o", "resources.use_gpu=true",
               "-o", "resources.num_workers=1", "-o", "train.precision=bf16", "--json"]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TRAIN_TIMEOUT_S, cwd=ROOT, check=False)
        except subprocess.TimeoutExpired:
            return _row("dcdit train smoke, 1 GPU, NCCL", False, f"> {TRAIN_TIMEOUT_S} s", "timed out")
        seconds = time.perf_counter() - start
    lines = proc.stdout.strip().splitlines()
    try:
        summary = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        summary = {}
    ok = proc.returncode == 0 and summary.get("status") == "FINISHED"
    detail = (f"status {summary.get('status')}, reached step {summary.get('step')}" if ok
              else f"exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-300:]}")
    return _row("dcdit train smoke, 1 GPU, NCCL", ok, f"{seconds:.0f} s", detail)


def check_sampling(device: torch.device, args) -> list[dict]:
    """Images per second of DDIM sampling: DiT-S/2 with CFG, DC-DiT-S (router calibrated to 1/N) with Lite-CFG."""
    rows = []
    for name, lite in (("DiT-S/2", False), ("DC-DiT-S", True)):
        config = preset(name, input_size=args.image_size // 8)
        torch.manual_seed(0)
        model = build_model(config).to(device).eval()
        shape = (config.in_channels, config.input_size, config.input_size)
        if family_of(config).routed:
            x = torch.randn(args.batch, *shape, device=device)
            t = torch.linspace(0, 999, args.batch, device=device).round().long()
            y = torch.randint(0, config.num_classes, (args.batch,), device=device)
            calibrate_router(model, x, t, y, 1.0 / config.downsample_factor)
        plan = SamplingPlan(sampler="ddim", steps=args.sample_steps, num_timesteps=1000,
                            learn_sigma=config.learn_sigma, cfg_scale=1.25 if lite else 1.5, lite_cfg=lite,
                            rho=0.0 if lite else None, null_class=config.num_classes, seed=0,
                            num_classes=config.num_classes)

        def sample(model=model, plan=plan, shape=shape):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                generate(model, plan, np.arange(args.batch), shape, device=device)

        sample()
        seconds = _timed(sample, device, 2)
        guidance = "Lite-CFG" if lite else "CFG"
        rows.append(_row(f"sample bf16 {name} {guidance}", True, f"{args.batch / seconds:.1f} images/s",
                         f"DDIM {args.sample_steps} steps, batch {args.batch}, {args.image_size} px"))
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'check':<36} {'result':<7} {'value':<18} detail"]
    lines += [f"{r['check']:<36} {r['result']:<7} {r['value']:<18} {r['detail']}" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="training and sampling batch (default 32)")
    parser.add_argument("--image-size", type=int, default=256, help="image side; latents are 1/8 (default 256)")
    parser.add_argument("--train-steps", type=int, default=10, help="timed training steps per row (default 10)")
    parser.add_argument("--sample-steps", type=int, default=10, help="DDIM steps per sampling call (default 10)")
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu for a dry run of the logic")
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON object")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}, built for CUDA "
              f"{torch.version.cuda or 'none'}); nothing to check. Run it on a machine with a GPU.")
        return 0
    start = time.perf_counter()
    header = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "cuda": torch.version.cuda, "flash_attn": _flash_attn_version()}
    matmul_row, peak = check_matmul(device, 8192 if device.type == "cuda" else 1024)
    rows = [matmul_row]
    for check, run in (("attention", lambda: check_attention(device)),
                       ("training", lambda: check_training(device, args, peak)),
                       ("dcdit train smoke, 1 GPU, NCCL", lambda: [check_smoke_training(device)]),
                       ("sampling", lambda: check_sampling(device, args))):
        result = _guarded(check, run)
        rows += result if isinstance(result, list) else [result]
    header["seconds"] = round(time.perf_counter() - start, 1)
    if args.json:
        print(json.dumps({**header, "rows": rows}, sort_keys=True))
    else:
        print(" ".join(f"{k} {v}" for k, v in header.items()))
        print(format_rows(rows))
    return 1 if any(r["result"] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
