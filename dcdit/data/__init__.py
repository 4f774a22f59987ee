"""Data sources for training: the embedded synthetic dataset, Parquet shards (pixels or VAE latents), the reader.

Pure torch/numpy/pyarrow: storage is a `pyarrow.fs.FileSystem` handed in by the caller (local by default).
"""

from dcdit.data.reader import Batch, DataReader, epoch_order, to_model_input
from dcdit.data.shards import (
    LAYOUTS,
    MANIFEST_NAME,
    Manifest,
    ShardDataset,
    ShardInfo,
    open_dataset,
    read_manifest,
    shard_name,
    write_dataset,
    write_manifest,
    write_shard,
)
from dcdit.data.synthetic import CLASS_NAMES, SyntheticBatch, SyntheticDataset, detail_auc, mask_to_tokens, render

__all__ = [
    "Batch", "DataReader", "epoch_order", "to_model_input",
    "LAYOUTS", "MANIFEST_NAME", "Manifest", "ShardDataset", "ShardInfo", "open_dataset", "read_manifest",
    "shard_name", "write_dataset", "write_manifest", "write_shard",
    "CLASS_NAMES", "SyntheticBatch", "SyntheticDataset", "detail_auc", "mask_to_tokens", "render",
]
