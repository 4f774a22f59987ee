"""Bad input as an attacker or an unlucky user gives it: configs, checkpoints, shards, statistics, images, weights
and command-line arguments. Every case runs through `dcdit_platform.cli.main(argv)` in this one process and must end
with exit code 2 and one error line that names the problem; crafted pickles must run nothing (their code would
create a marker file). Static cases live in tests/platform/bad_inputs/, files that need building are made once by
the `made` fixture."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from dcdit_platform.cli import main

CORPUS = Path(__file__).parent / "bad_inputs"


class CodeRunner:
    """Unpickling this runs code: it creates the marker file (what a crafted weights file would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


@dataclass(frozen=True)
class Made:
    root: Path
    marker: Path
    evil_pth: Path  # a torch pickle whose unpickling runs code
    images: Path  # a folder of two valid PNG images


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Made:
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("bad-inputs")
    marker = root / "code-ran.marker"
    evil = root / "evil.pth"
    torch.save({"features.0.weight": CodeRunner(marker)}, evil)
    images = root / "images"
    images.mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(images / f"{i}.png")
    return Made(root=root, marker=marker, evil_pth=evil, images=images)


def train(config: str):
    """`dcdit train` of a config file of the corpus (storage in the made folder: nothing lands in the checkout)."""
    return lambda m: ["train", str(CORPUS / "configs" / config), "--storage", str(m.root / "runs")]


# id -> (argv built from the made files, a fragment the error line must contain)
CASES = {
    "config/num-heads-zero": (train("num-heads-zero.yaml"), "model.num_heads=0 must be in [1, 256]"),
    "config/patch-size-zero": (train("patch-size-zero.yaml"), "model.patch_size=0 must be in [1, 64]"),
    "config/hidden-size-negative": (train("hidden-size-negative.yaml"), "model.hidden_size=-64"),
    "config/depth-absurd": (train("depth-absurd.yaml"), "model.depth=1000000000 must be in [1, 256]"),
    "config/seed-absurd": (train("seed-absurd.yaml"), "seed=1208925819614629174706176 must be in [0, 4294967295]"),
    "config/data-seed-negative": (train("data-seed-negative.yaml"), "data.seed=-3"),
    "config/steps-absurd": (train("steps-absurd.yaml"), "train.steps=1000000000000000000000000000000 must be in"),
    "config/width-not-divisible-by-heads": (train("width-not-divisible-by-heads.yaml"),
                                            "must be divisible by num_heads=8"),
    "config/grid-not-divisible-by-patch": (train("grid-not-divisible-by-patch.yaml"), "must divide input_size=16"),
    "config/alias-bomb": (train("alias-bomb.yaml"), "aliases expand to more than 100000 values"),
    "config/memory-beyond-any-machine": (train("memory-beyond-any-machine.yaml"), "the model needs about"),
    "config/not-a-mapping": (train("not-a-mapping.yaml"), "must hold a mapping"),
    "config/unknown-key": (train("unknown-key.yaml"), "did you mean 'train'"),
    "config/base-loop": (train("base-loop.yaml"), "config inheritance loops"),
    "config/tab-indented": (train("tab-indented.yaml"), "cannot parse"),
    "config/missing-file": (train("no-such-file.yaml"), "does not exist"),
    "weights/vgg16-pickled-code-fid": (
        lambda m: ["fid", str(m.images), str(m.images), "--extractor", "vgg16", "--weights", str(m.evil_pth)],
        "evil.pth"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_error_line_with_exit_2_and_runs_nothing(case, made, capsys):
    argv, fragment = CASES[case]
    capsys.readouterr()
    rc = main(argv(made))
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert rc == 2, (case, rc, out[-2000:], err[-2000:])
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert errors[0].startswith(f"dcdit {argv(made)[0]}: error: "), errors[0]
    assert fragment in errors[0], errors[0]
    assert not made.marker.exists(), "a crafted pickle ran its code"
    assert not any(json.loads(line).get("fd") != json.loads(line).get("fd")  # NaN never printed as a result
                   for line in out.splitlines() if line.startswith("{"))
