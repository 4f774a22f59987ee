"""Where a training worker computes and in which precision: the one place that decides device, precision and CPU
threads (`select_runtime`), and the autocast context the forward passes run under (`Runtime.autocast`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from dcdit.errors import DCDiTError
from dcdit_platform.config import ExperimentConfig


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
