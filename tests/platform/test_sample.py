"""`dcdit sample` and `dcdit export` on tiny runs trained in this process (run_local): the same class and seed give
the same pixels whatever --per-class and --batch-size; file names, the grid, DC-DiT boundary maps; a run by name;
an export directory samples what its checkpoint samples; one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import dcdit
from dcdit_platform.cli import main
from dcdit_platform.config import build_config
from dcdit_platform.training import plan_run, run_local
from helpers.training import DIT, tiny_config

FAST = ["--sampler", "ddim", "--steps", "4"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Storage with a 4-step DC-DiT run 'tiny' and a 4-step DiT run 'tinydit' (8x8 RGB, 4 classes)."""
    root = str(tmp_path_factory.mktemp("store"))
    for name, sections in (("tiny", {}), ("tinydit", {"model": DIT})):
        config = build_config(tiny_config(storage={"uri": root}, train={"steps": 4}, **sections))
        run_local(plan_run(config, name=name))
    return root


def sample(capsys, *args) -> dict:
    assert main(["sample", *map(str, args), "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-2].endswith(json.loads(out[-1])["out"])  # the one line saying where the images went
    return json.loads(out[-1])


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_same_seed_same_pixels_on_any_split(store, tmp_path, capsys):
    run = f"{store}/tiny"
    one = sample(capsys, run, "--class", 1, 3, "--per-class", 2, "--batch-size", 1, "--out", tmp_path / "a", *FAST)
    names = sorted(p.rsplit("/", 1)[1] for p in one["files"])
    assert names == ["class0001_seed0.png", "class0001_seed1.png", "class0003_seed0.png", "class0003_seed1.png"]
    three = sample(capsys, run, "--class", 3, 1, "--per-class", 3, "--batch-size", 4, "--out", tmp_path / "b", *FAST)
    sample(capsys, run, "--class", 1, "--seed", 1, "--out", tmp_path / "c", *FAST)
    for name in names:
        assert np.array_equal(pixels(tmp_path / "a" / name), pixels(tmp_path / "b" / name)), name
    assert np.array_equal(pixels(tmp_path / "c" / "class0001_seed1.png"),
                          pixels(tmp_path / "a" / "class0001_seed1.png"))
    first = pixels(tmp_path / "a" / "class0001_seed0.png")
    assert first.shape == (8, 8, 3) and first.dtype == np.uint8
    assert not np.array_equal(first, pixels(tmp_path / "a" / "class0001_seed1.png"))  # seeds differ
    assert not np.array_equal(first, pixels(tmp_path / "a" / "class0003_seed0.png"))  # classes differ
    assert (one["sampler"], one["steps"], one["ema"], one["step"], len(three["files"])) == ("ddim", 4, True, 4, 6)


def test_grid_holds_each_image_one_row_per_class(store, tmp_path, capsys):
    out = sample(capsys, f"{store}/tiny", "--class", 0, 2, "--per-class", 3, "--grid", "--out", tmp_path, *FAST)
    grid = pixels(out["grid"])
    pad = 2  # dcdit.viz.sample_grid's padding
    assert grid.shape == (2 * 8 + 3 * pad, 3 * 8 + 4 * pad, 3)
    for row, label in enumerate((0, 2)):
        for col in range(3):
            top, left = pad + row * (8 + pad), pad + col * (8 + pad)
            tile = grid[top:top + 8, left:left + 8]
            assert np.array_equal(tile, pixels(tmp_path / f"class{label:04d}_seed{col}.png")), (row, col)


def test_dc_dit_boundary_maps_beside_the_images(store, tmp_path, capsys):
    out = sample(capsys, f"{store}/tiny", "--class", 1, "--per-class", 2, "--boundaries", "--lite-cfg",
                 "--out", tmp_path, *FAST)
    assert sorted(p.rsplit("/", 1)[1] for p in out["boundary_maps"]) == [
        "class0001_seed0_boundaries.png", "class0001_seed1_boundaries.png"]
    picture = Image.open(out["boundary_maps"][0])
    assert picture.format == "PNG" and picture.size[0] > 100  # a rendered figure, not an 8 px image
    assert out["lite_cfg"] and out["cfg_scale"] == 1.25


def test_run_name_in_storage_and_export_sample_the_same(store, tmp_path, capsys):
    by_name = sample(capsys, "tinydit", "--storage", store, "--class", 2, "--out", tmp_path / "a", *FAST)
    assert by_name["arch"] == "dit" and by_name["source"].endswith("checkpoint_00000004")
    assert main(["export", f"{store}/tinydit", str(tmp_path / "exp"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["format"] == "dcdit" and summary["out"] == str(tmp_path / "exp")
    model = dcdit.from_pretrained(tmp_path / "exp")
    assert model.config.num_classes == 4 and not model.training
    exported = sample(capsys, tmp_path / "exp", "--class", 2, "--out", tmp_path / "b", *FAST)
    assert np.array_equal(pixels(tmp_path / "a" / "class0002_seed0.png"),
                          pixels(tmp_path / "b" / "class0002_seed0.png"))
    assert exported["steps"] == 4
    assert main(["export", f"{store}/tinydit", str(tmp_path / "hf"), "--diffusers"]) == 0
    assert (tmp_path / "hf" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert dcdit.load_dit(tmp_path / "hf").config.depth == 2


@pytest.mark.parametrize(("args", "message"), [
    (["sample", "{tmp}/nowhere", "--class", "1"], "no checkpoint, run or export at"),
    (["sample", "missing-run", "--storage", "{store}", "--class", "1"], "no checkpoint, run or export at"),
    (["sample", "{store}/tiny", "--class", "9"], "--class 9 is out of range: this model knows classes 0..3"),
    (["sample", "{store}/tinydit", "--class", "1", "--boundaries"], "this DiT has no router"),
    (["sample", "{store}/tinydit", "--class", "1", "--tail-drop", "0.5"], "--tail-drop"),
    (["sample", "{store}/tiny", "--class", "1", "--steps", "5000"], "more than"),
    (["export", "{store}/tiny", "{tmp}/dc", "--diffusers"], "a DC-DiT checkpoint cannot be exported to diffusers"),
])
def test_bad_input_is_one_line(store, tmp_path, capsys, args, message):
    assert main([a.format(tmp=tmp_path, store=store) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"dcdit {args[0]}: error:") and message in err, err
    assert not (tmp_path / "dc").exists()
