"""Preparation with Ray Data on a real local Ray cluster, and the `prepare-data` / `data-info` commands."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dcdit.data import SyntheticDataset, open_dataset, write_dataset
from dcdit.data.reader import to_model_input
from dcdit.data.synthetic import render
from dcdit.data.vae import center_crop_arr, encode, load_vae, sample_seed
from dcdit.errors import DCDiTError
from dcdit_platform import cli
from dcdit_platform.prepare import PROGRESS_DIR, PrepareConfig, prepare_dataset


@pytest.fixture
def main(monkeypatch):
    """The real `dcdit` entry point, with only this module's commands registered (the others are tested apart)."""
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("data",))
    return cli.main


def shard_hashes(root: str) -> list[str]:
    return [s.sha256 for s in open_dataset(root).manifest.shards]


def test_synthetic_pixels_equal_the_in_process_writer(ray_cluster, tmp_path):
    dest = str(tmp_path / "prepared")
    summary = prepare_dataset(PrepareConfig(source="synthetic", dest=dest, num_samples=200, shard_size=64, seed=3),
                              progress=False)
    assert summary["complete"] and (summary["written"], summary["skipped"], summary["shards"]) == (4, 0, 4)
    assert (summary["layout"], summary["shape"], summary["dtype"]) == ("pixels", [16, 16, 3], "uint8")  # the default
    write_dataset(str(tmp_path / "direct"), SyntheticDataset(200, seed=3, image_size=16), shard_size=64)
    assert shard_hashes(dest) == shard_hashes(str(tmp_path / "direct"))  # byte-identical shards
    ds = open_dataset(dest)
    assert ds.manifest.mask_shape == (16, 16) and len(ds.verify()) == 4
    assert not os.path.exists(os.path.join(dest, PROGRESS_DIR))
    # Running it again finds the finished dataset and does nothing.
    again = prepare_dataset(PrepareConfig(source="synthetic", dest=dest, num_samples=200, shard_size=64, seed=3),
                            progress=False)
    assert (again["written"], again["skipped"]) == (0, 4)
    with pytest.raises(DCDiTError, match="already holds a different dataset"):
        prepare_dataset(PrepareConfig(source="synthetic", dest=dest, num_samples=200, shard_size=64, seed=4),
                        progress=False)


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-vae")
    AutoencoderKL(block_out_channels=(32,), layers_per_block=1, latent_channels=4, norm_num_groups=32,
                  sample_size=32).save_pretrained(str(path))
    return str(path)


def test_vae_latents_equal_encoding_the_images_directly(ray_cluster, tmp_path, tiny_vae):
    dest = str(tmp_path / "latents")
    summary = prepare_dataset(PrepareConfig(source="synthetic", dest=dest, num_samples=40, shard_size=16,
                                            image_size=16, vae=tiny_vae, seed=1, encode_batch_size=8),
                              progress=False)
    assert (summary["layout"], summary["shape"], summary["dtype"]) == ("latents", [4, 16, 16], "float16")
    ds = open_dataset(dest)
    assert ds.manifest.source["vae"] == tiny_vae and ds.manifest.source["latent_scale"] == 0.18215
    stored, labels = ds.read(np.arange(40))
    vae = load_vae(tiny_vae)
    images = render(np.arange(40), seed=1, image_size=16)
    direct = encode(vae, to_model_input(images.images, "pixels"), [sample_seed(1, i) for i in range(40)])
    torch.testing.assert_close(torch.from_numpy(stored).float(), direct.half().float(), rtol=0, atol=2e-3)
    np.testing.assert_array_equal(labels, images.labels)


def test_interrupted_preparation_resumes_without_rewriting_finished_shards(ray_cluster, tmp_path):
    dest = tmp_path / "resumable"
    config = PrepareConfig(source="synthetic", dest=str(dest), num_samples=160, shard_size=32, seed=2)
    first = prepare_dataset(PrepareConfig(**{**config.__dict__, "max_shards": 2}), progress=False)
    assert not first["complete"] and first["shards_done"] == 2
    with pytest.raises(DCDiTError, match="not a dataset"):
        open_dataset(str(dest))
    finished = sorted(p.name for p in dest.glob("shard-*.parquet"))
    assert len(finished) == 2
    stamps = {name: (os.stat(dest / name).st_mtime_ns, os.stat(dest / name).st_ino) for name in finished}
    # What a crash mid-write leaves: a shard file without its done marker, and a temporary file.
    unfinished = sorted({f"shard-0000{i}.parquet" for i in range(5)} - set(finished))[0]
    (dest / unfinished).write_bytes(b"partial garbage")
    (dest / "shard-00004.parquet.tmp-0badf00d").write_bytes(b"partial")

    second = prepare_dataset(config, progress=False)
    assert second["complete"] and (second["written"], second["skipped"]) == (3, 2)
    for name, stamp in stamps.items():
        assert (os.stat(dest / name).st_mtime_ns, os.stat(dest / name).st_ino) == stamp, f"{name} was rewritten"
    assert not list(dest.glob("*.tmp-*"))
    write_dataset(str(tmp_path / "direct"), SyntheticDataset(160, seed=2, image_size=16), shard_size=32)
    assert shard_hashes(str(dest)) == shard_hashes(str(tmp_path / "direct"))
    assert len(open_dataset(str(dest)).verify()) == 5


def make_image_folder(root, corrupt: bool = False):
    rng = np.random.default_rng(0)
    sizes = [(40, 30), (64, 48), (20, 20), (100, 37), (33, 65)]
    for cls in ("n01", "n02"):
        (root / cls).mkdir(parents=True)
        for k, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / cls / f"img{k}.png")
    (root / "n02" / "notes.txt").write_text("not an image")
    if corrupt:
        (root / "n02" / "img3.png").write_bytes(b"\x89PNG broken")


def test_image_folder_in_imagenet_layout(ray_cluster, tmp_path):
    make_image_folder(tmp_path / "images")
    dest = str(tmp_path / "folder-ds")
    summary = prepare_dataset(PrepareConfig(source=str(tmp_path / "images"), dest=dest, image_size=16,
                                            shard_size=4), progress=False)
    assert (summary["num_samples"], summary["shards"], summary["num_classes"]) == (10, 3, 2)
    ds = open_dataset(dest)
    assert ds.class_names == ["n01", "n02"] and ds.manifest.mask_shape is None
    data, labels = ds.read(np.arange(10))
    assert labels.tolist() == [0] * 5 + [1] * 5
    expected = center_crop_arr(Image.open(tmp_path / "images" / "n02" / "img3.png"), 16)
    np.testing.assert_array_equal(data[8], expected)


def test_a_corrupt_image_is_a_one_line_error_naming_it(ray_cluster, tmp_path):
    make_image_folder(tmp_path / "images", corrupt=True)
    with pytest.raises(DCDiTError, match=r"cannot decode image .*n02/img3.png") as info:
        prepare_dataset(PrepareConfig(source=str(tmp_path / "images"), dest=str(tmp_path / "out"), image_size=16,
                                      shard_size=4), progress=False)
    assert "\n" not in str(info.value)


def test_cli_prepares_to_s3_and_describes_it(ray_cluster, s3_server, capsys, main):
    uri = s3_server.uri("cli")
    assert main(["prepare-data", "synthetic", uri, "--num-samples", "64", "--shard-size", "32", "--json",
                 "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["dest"] == uri and summary["complete"] and summary["shards"] == 2
    assert main(["data-info", uri, "--verify", "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (info["num_samples"], info["num_shards"], info["shape"], info["dtype"]) == (64, 2, [16, 16, 3], "uint8")
    assert info["verified"] and info["class_names"][:2] == ["checkered disc", "striped square"]
    assert main(["data-info", uri]) == 0
    text = capsys.readouterr().out
    assert "samples  64 in 2 shards" in text and "pixels HWC 16x16x3 uint8" in text


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys, main):
    assert main(["data-info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a dataset: no MANIFEST.json" in err

    write_dataset(str(tmp_path / "ds"), SyntheticDataset(64, seed=0), shard_size=32)
    shard = tmp_path / "ds" / "shard-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-10])
    assert main(["data-info", str(tmp_path / "ds")]) == 0  # without --verify only the manifest is read
    capsys.readouterr()
    assert main(["data-info", str(tmp_path / "ds"), "--verify"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "shard-00001.parquet" in err and "truncated" in err

    assert main(["prepare-data", "synthetic", str(tmp_path / "x"), "--vae", str(tmp_path / "no-vae")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no VAE directory" in err
    assert main(["prepare-data", str(tmp_path / "missing"), str(tmp_path / "y")]) == 2
    assert "neither 'synthetic' nor an image folder" in capsys.readouterr().err
