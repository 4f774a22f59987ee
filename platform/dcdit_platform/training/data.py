"""The data a training worker reads: the synthetic dataset or prepared shards (local or S3), the resumable reader
over this rank's part of each global batch, and the plan-time check that prepared shards fit the model.
"""

from __future__ import annotations

from dcdit.data import DataReader, SyntheticDataset, open_dataset, read_manifest
from dcdit.errors import DCDiTError
from dcdit_platform.config import ExperimentConfig
from dcdit_platform.secrets import redact
from dcdit_platform.storage import open_storage


def open_source(config: ExperimentConfig, storage_options: dict | None = None):
    """The dataset the reader draws from: the synthetic one, or prepared shards (local or S3)."""
    d = config.data
    if d.is_synthetic:
        return SyntheticDataset(d.num_samples, image_size=d.image_size, num_classes=d.num_classes,
                                seed=config.data_seed)
    storage = open_storage(d.source, storage_options)
    return open_dataset(storage.root, filesystem=storage.filesystem, name=redact(d.source))


def make_reader(config: ExperimentConfig, source, rank: int, world_size: int, cursor: dict | None) -> DataReader:
    """This rank's share of every global batch, continuing from `cursor` (a checkpoint's data position)."""
    d = config.data
    return DataReader(source, batch_size=config.train.global_batch // world_size, rank=rank, world_size=world_size,
                      seed=config.data_seed, shuffle=d.shuffle, shuffle_window=d.shuffle_window,
                      prefetch=d.prefetch, cursor=cursor)


def check_data(config: ExperimentConfig) -> None:
    """Prepared shards must fit the model: layout, channels, size, classes."""
    if config.data.is_synthetic:
        return
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
