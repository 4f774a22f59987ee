"""dcdit: Dynamic Chunking Diffusion Transformers (arXiv 2603.06351) as a plain PyTorch library.

This package never imports Ray, MLflow, s3fs or the platform; `dcdit_platform` builds on it.
"""

from dcdit.config import PRESETS, ModelConfig, preset
from dcdit.errors import DCDiTError
from dcdit.export import from_pretrained
from dcdit.models import DCDiT, DiT, build_model, create_model
from dcdit.pretrained import load_dit
from dcdit.upcycle import upcycle

__version__ = "0.1.0"

__all__ = ["PRESETS", "ModelConfig", "preset", "DCDiTError", "DCDiT", "DiT", "build_model", "create_model",
           "load_dit", "upcycle", "from_pretrained"]
