"""Parquet shards and their manifest: round trip, integrity errors that name the file, the shard cache."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.fs as pafs
import pytest

from dcdit.data import (
    MANIFEST_NAME,
    DataReader,
    SyntheticDataset,
    open_dataset,
    read_manifest,
    write_dataset,
    write_manifest,
    write_shard,
)
from dcdit.data.shards import Manifest
from dcdit.errors import DCDiTError


@pytest.fixture
def pixels(tmp_path):
    src = SyntheticDataset(100, seed=4)
    root = str(tmp_path / "pixels")
    write_dataset(root, src, shard_size=32)
    return src, root


def test_pixel_round_trip_through_a_local_folder(pixels):
    src, root = pixels
    ds = open_dataset(root)
    m = ds.manifest
    assert (len(ds), m.layout, m.axes, m.dtype, m.shape) == (100, "pixels", "HWC", "uint8", (32, 32, 3))
    assert [s.rows for s in m.shards] == [32, 32, 32, 4]
    assert [s.file for s in m.shards] == [f"shard-0000{i}.parquet" for i in range(4)]
    assert m.num_classes == 10 and m.class_names[0] == "checkered disc"
    assert m.source == src.describe() and m.mask_shape == (32, 32)
    idx = np.array([99, 0, 33, 64, 31, 32])
    data, labels = ds.read(idx)
    want_data, want_labels = src.read(idx)
    np.testing.assert_array_equal(data, want_data)
    np.testing.assert_array_equal(labels, want_labels)
    np.testing.assert_array_equal(ds.read_masks(idx), src.read_masks(idx))
    x, y = ds[5]
    x_src, y_src = src[5]
    assert y == y_src and (x == x_src).all()
    assert len(ds.verify()) == 4


def test_latent_round_trip_and_reader_over_shards(tmp_path):
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((40, 4, 8, 8)).astype(np.float16)
    labels = np.arange(40) % 3
    shards = [write_shard(str(tmp_path), k, np.arange(k * 16, min(k * 16 + 16, 40)), labels[k * 16:k * 16 + 16],
                          latents[k * 16:k * 16 + 16]) for k in range(3)]
    manifest = Manifest(layout="latents", shape=(4, 8, 8), num_classes=3, class_names=("a", "b", "c"),
                        shards=tuple(shards), source={"kind": "test"})
    write_manifest(str(tmp_path), manifest)
    ds = open_dataset(str(tmp_path))
    assert ds.manifest == manifest
    with pytest.raises(DCDiTError, match="no detail masks"):
        ds.read_masks([0])
    seen = []
    for batch in DataReader(ds, batch_size=8, seed=1, epochs=1):
        assert batch.x.dtype.is_floating_point and batch.x.shape == (8, 4, 8, 8)
        np.testing.assert_array_equal(batch.x.numpy(), latents[batch.index.numpy()].astype(np.float32))
        np.testing.assert_array_equal(batch.y.numpy(), labels[batch.index.numpy()])
        seen += batch.index.tolist()
    assert sorted(seen) == list(range(40))


def test_a_folder_without_manifest_is_not_a_dataset(pixels):
    _, root = pixels
    (pafs.LocalFileSystem()).delete_file(f"{root}/{MANIFEST_NAME}")
    with pytest.raises(DCDiTError, match=r"not a dataset: no MANIFEST.json .*prepare-data"):
        open_dataset(root)


def test_invalid_manifests_are_named(pixels, tmp_path):
    _, root = pixels
    path = f"{root}/{MANIFEST_NAME}"
    data = json.loads(open(path).read())
    data["num_samples"] = 101
    open(path, "w").write(json.dumps(data))
    with pytest.raises(DCDiTError, match="num_samples 101 != 100"):
        read_manifest(root)
    open(path, "w").write("{not json")
    with pytest.raises(DCDiTError, match="not valid JSON"):
        read_manifest(root)


@pytest.mark.parametrize("name", ["../outside.parquet", "/etc/passwd", "sub/shard.parquet", "..", ".hidden", "",
                                  "a\\b.parquet", "x" * 200])
def test_shard_files_must_be_plain_names_inside_the_dataset(pixels, tmp_path, name):
    """A manifest naming a file elsewhere is refused before any file is opened: `outside.parquet` holds a valid copy
    of shard 0 next to the dataset, so following the name would succeed."""
    _, root = pixels
    path = f"{root}/{MANIFEST_NAME}"
    data = json.loads(open(path).read())
    (tmp_path / "outside.parquet").write_bytes(open(f"{root}/{data['shards'][0]['file']}", "rb").read())
    data["shards"][0]["file"] = name
    open(path, "w").write(json.dumps(data))
    with pytest.raises(DCDiTError, match="is not a plain file name inside the dataset folder"):
        open_dataset(root).verify()


@pytest.mark.parametrize("field, value, says", [("shape", [65536, 65536, 3], "shape"),
                                                ("num_classes", 0, "num_classes"), ("mask_shape", [0, 4], "mask_shape")])
def test_sizes_outside_their_bounds_are_refused(pixels, field, value, says):
    _, root = pixels
    path = f"{root}/{MANIFEST_NAME}"
    data = json.loads(open(path).read())
    data[field] = value
    open(path, "w").write(json.dumps(data))
    with pytest.raises(DCDiTError, match=says):
        read_manifest(root)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_corrupt_truncated_or_missing_shard_is_named(pixels, damage):
    _, root = pixels
    shard = f"{root}/shard-00002.parquet"
    payload = bytearray(open(shard, "rb").read())
    if damage == "flip":
        payload[100] ^= 0x01
        open(shard, "wb").write(bytes(payload))
        message = r"shard-00002.parquet .* is corrupt: sha256"
    elif damage == "truncate":
        open(shard, "wb").write(bytes(payload[: len(payload) // 2]))
        message = r"shard-00002.parquet .* is truncated"
    else:
        pafs.LocalFileSystem().delete_file(shard)
        message = r"shard-00002.parquet .* is missing"
    ds = open_dataset(root)  # opening reads only the manifest
    ds.read([0])  # other shards still read fine
    with pytest.raises(DCDiTError, match=message) as info:
        ds.verify()
    assert "\n" not in str(info.value)
    with pytest.raises(DCDiTError, match=message):
        ds.read([70])


def test_lru_cache_bounds_memory_and_counts_loads(pixels):
    _, root = pixels
    ds = open_dataset(root, cache_bytes=40 * 3072)  # room for one 32-sample shard (~100 KB decoded)
    ds.read([0, 1])
    ds.read([2])
    assert ds.shard_loads == 1
    ds.read([40])
    ds.read([3])
    assert ds.shard_loads == 3  # shard 0 was evicted by shard 1
    big = open_dataset(root)
    for i in (0, 40, 70, 99, 1, 41):
        big.read([i])
    assert big.shard_loads == 4


def test_reader_warns_when_a_global_shuffle_would_thrash_the_cache(pixels):
    _, root = pixels
    with pytest.warns(UserWarning, match="exceeds the shard cache"):
        DataReader(open_dataset(root, cache_bytes=100_000), batch_size=4)
    DataReader(open_dataset(root, cache_bytes=100_000), batch_size=4, shuffle_window=1)  # no warning


def test_write_shard_needs_consecutive_indices(tmp_path):
    with pytest.raises(DCDiTError, match="consecutive"):
        write_shard(str(tmp_path), 0, [0, 2], [0, 0], np.zeros((2, 4, 4, 3), np.uint8))
    assert not any(p.name.endswith(".parquet") for p in tmp_path.iterdir())
