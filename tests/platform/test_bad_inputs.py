"""Bad input as an attacker or an unlucky user gives it: configs, checkpoints, shards, statistics, images, weights
and command-line arguments. Every case runs through `dcdit_platform.cli.main(argv)` in this one process and must end
with exit code 2 and one error line that names the problem; crafted pickles must run nothing (their code would
create a marker file). Static cases live in tests/platform/bad_inputs/, files that need building are made once by
the `made` fixture."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcdit.features import DOMAIN_EXTRACTOR
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
    classifier: Path  # an (untrained) domain classifier: a 128-dimensional extractor that builds in milliseconds
    stats: Path  # a valid statistics npz for it
    checkpoint: Path  # a valid tiny DiT checkpoint
    dataset: Path  # a valid prepared dataset

    def path(self, *parts: str) -> str:
        return str(self.root.joinpath(*parts))

    def extractor(self) -> list[str]:
        return ["--extractor", DOMAIN_EXTRACTOR, "--weights", str(self.classifier)]


def remanifest(directory: Path) -> None:
    """Rewrite a checkpoint's manifest for its files as they are now (so that a test reaches the content check)."""
    manifest = json.loads((directory / "MANIFEST.json").read_text())
    for name, entry in manifest["files"].items():
        data = (directory / name).read_bytes()
        entry.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    (directory / "MANIFEST.json").write_text(json.dumps(manifest))


def copy_checkpoint(m_root: Path, source: Path, name: str, **files: str) -> Path:
    """A copy of checkpoint `source` under {root}/{name}/ with some files' text replaced, manifest rewritten."""
    target = m_root / name / source.name
    shutil.copytree(source, target)
    for file, text in files.items():
        (target / file.replace("_", ".")).write_text(text)
    remanifest(target)
    return target


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Made:
    from dcdit.data import SyntheticDataset, write_dataset
    from dcdit.features import DomainClassifier
    from helpers.evaluation import tiny_checkpoint

    root = tmp_path_factory.mktemp("bad-inputs")
    marker = root / "code-ran.marker"
    evil = root / "evil.pth"
    torch.save({"features.0.weight": CodeRunner(marker)}, evil)
    images = root / "images"
    images.mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(images / f"{i}.png")
    classifier = DomainClassifier(num_classes=4, image_size=8).save(root / "classifier.safetensors")
    rng = np.random.default_rng(0)
    features = rng.standard_normal((300, 128))
    stats = root / "stats.npz"
    np.savez(stats, mu=features.mean(0), sigma=np.cov(features, rowvar=False))
    made = Made(root=root, marker=marker, evil_pth=evil, images=images, classifier=classifier, stats=stats,
                checkpoint=tiny_checkpoint(root / "runs"),
                dataset=root / "dataset")
    write_dataset(str(made.dataset), SyntheticDataset(16, image_size=8, num_classes=4, seed=0), shard_size=8)
    _bad_files(made, features)
    return made


def _bad_files(m: Made, features: np.ndarray) -> None:
    """The corpus files that are built from valid ones."""
    mu, sigma = features.mean(0), np.cov(features, rowvar=False)
    np.savez(m.path("no-sigma.npz"), mu=mu)
    torch.save({"features.0.weight": torch.zeros(2, 3, 3, 3)}, m.path("small.pt"))
    _bad_classifiers(m)
    np.savez(m.path("bad-meta.npz"), mu=mu, sigma=sigma, meta=np.array("{not json"))
    np.savez(m.path("nan.npz"), mu=np.where(np.arange(128) == 3, np.nan, mu), sigma=sigma)
    np.savez(m.path("sigma-shape.npz"), mu=mu, sigma=sigma[:5])
    np.savez(m.path("pickled.npz"), mu=np.array([CodeRunner(m.marker)], dtype=object), sigma=sigma)
    (m.root / "not-npz.npz").write_text("hello")
    not_images = m.root / "not-images"
    shutil.copytree(m.images, not_images)
    (not_images / "2.png").write_text("this is text, not a PNG")
    ckpt = m.checkpoint
    copy_checkpoint(m.root, ckpt, "state-list", state_json="[1, 2, 3]")
    copy_checkpoint(m.root, ckpt, "state-step-text", state_json=json.dumps({"step": "ten", "run_name": "tiny"}))
    config = json.loads((ckpt / "config.json").read_text())
    other = {**config, "model": {**config["model"], "arch": "dcdit", "scaffold_width": 16, "encoder_blocks": 1,
                                 "decoder_blocks": 1, "downsample_factor": 2}}
    copy_checkpoint(m.root, ckpt, "other-arch", config_json=json.dumps(other))
    truncated = m.root / "truncated" / ckpt.name
    shutil.copytree(ckpt, truncated)
    (truncated / "model.safetensors").write_bytes((truncated / "model.safetensors").read_bytes()[:100])
    pickled = m.root / "optimizer-code" / ckpt.name
    shutil.copytree(ckpt, pickled)
    torch.save({"state": {0: CodeRunner(m.marker)}}, pickled / "optimizer.pt")
    manifest = json.loads((pickled / "MANIFEST.json").read_text())
    manifest["files"]["optimizer.pt"] = {"sha256": "0" * 64, "size": 0}
    (pickled / "MANIFEST.json").write_text(json.dumps(manifest))
    remanifest(pickled)
    _bad_datasets(m)


def _bad_classifiers(m: Made) -> None:
    """Domain classifier files (safetensors) whose metadata or tensors do not describe one."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(m.classifier), framework="pt") as f:
        record = json.loads(f.metadata()["dcdit"])
    state = load_file(str(m.classifier))
    save_file(state, m.path("clf-bad-meta.safetensors"), metadata={"dcdit": "{not json"})
    huge = {**record, "config": {**record["config"], "feature_dim": 10**9}}
    save_file(state, m.path("clf-huge.safetensors"), metadata={"dcdit": json.dumps(huge)})
    narrow = {**record, "config": {**record["config"], "feature_dim": 64}}
    save_file(state, m.path("clf-shapes.safetensors"), metadata={"dcdit": json.dumps(narrow)})


def _bad_datasets(m: Made) -> None:
    """Datasets whose manifest names a file outside the dataset (a real shard's copy there, so that reading it
    would succeed), or absurd shapes and counts."""
    manifest = json.loads((m.dataset / "MANIFEST.json").read_text())
    outside = m.root / "outside"
    outside.mkdir()
    shutil.copy(m.dataset / "shard-00000.parquet", outside / "shard-00000.parquet")
    for name, change in {
        "traversal": lambda d: d["shards"][0].update(file="../../outside/shard-00000.parquet"),
        "absolute": lambda d: d["shards"][0].update(file=str(outside / "shard-00000.parquet")),
        "huge-shape": lambda d: d.update(shape=[65536, 65536, 3]),
        "negative-bytes": lambda d: d["shards"][0].update(bytes=-1),
        "classes-absurd": lambda d: d.update(num_classes=10**12),
    }.items():
        data = json.loads(json.dumps(manifest))
        change(data)
        target = m.root / "datasets" / name
        shutil.copytree(m.dataset, target)
        (target / "MANIFEST.json").write_text(json.dumps(data))


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
    # statistics and image inputs of `dcdit fid`
    "stats/missing-sigma": (lambda m: ["fid", m.path("no-sigma.npz"), str(m.stats), *m.extractor()],
                            "no-sigma.npz"),
    "stats/meta-not-json": (lambda m: ["fid", m.path("bad-meta.npz"), str(m.stats), *m.extractor()],
                            "bad-meta.npz"),
    "stats/nan": (lambda m: ["fid", m.path("nan.npz"), str(m.stats), *m.extractor(), "--json"], "nan.npz"),
    "stats/sigma-shape": (lambda m: ["fid", m.path("sigma-shape.npz"), str(m.stats), *m.extractor()],
                          "sigma-shape.npz"),
    "stats/pickled-object-array": (lambda m: ["fid", m.path("pickled.npz"), str(m.stats), *m.extractor()],
                                   "pickled.npz"),
    "stats/not-npz": (lambda m: ["fid", m.path("not-npz.npz"), str(m.stats), *m.extractor()], "not-npz.npz"),
    "images/text-named-png": (lambda m: ["fid", m.path("not-images"), str(m.images), *m.extractor()], "2.png"),
    "images/empty-folder": (lambda m: ["fid", m.path("outside"), str(m.images), *m.extractor()], "no images"),
    # checkpoints given to `dcdit eval`
    "checkpoint/state-json-a-list": (lambda m: ["eval", m.path("state-list"), "--no-tracking", *m.extractor()],
                                     "state.json"),
    "checkpoint/state-step-not-a-number": (
        lambda m: ["eval", m.path("state-step-text"), "--no-tracking", *m.extractor()], "state.json"),
    "checkpoint/config-of-another-architecture": (
        lambda m: ["eval", m.path("other-arch"), "--no-tracking", *m.extractor()], "other-arch"),
    "checkpoint/truncated-weights": (lambda m: ["eval", m.path("truncated"), "--no-tracking", *m.extractor()],
                                     "truncated"),
    "checkpoint/optimizer-with-code": (
        lambda m: ["eval", m.path("optimizer-code"), "--no-tracking", *m.extractor()], "pickled code"),
    "checkpoint/not-a-checkpoint": (lambda m: ["eval", str(m.images), "--no-tracking", *m.extractor()],
                                    "no checkpoint"),
    # weights of any extractor
    "weights/vgg16-pickled-code-eval": (
        lambda m: ["eval", str(m.checkpoint), "--no-tracking", "--extractor", "vgg16", "--weights", str(m.evil_pth)],
        "evil.pth"),
    "weights/inception-pickled-code": (lambda m: ["fid", str(m.images), str(m.images), "--extractor",
                                                  "inception-v3-compat", "--weights", str(m.evil_pth)],
                                       "pickled code"),
    "weights/vgg16-wrong-shapes": (lambda m: ["fid", str(m.images), str(m.images), "--extractor", "vgg16",
                                              "--weights", m.path("small.pt")], "does not hold the vgg16 weights"),
    "weights/torchscript-extractor-with-weights": (
        lambda m: ["fid", str(m.images), str(m.images), "--extractor", "clip-vit-b-32", "--weights",
                   m.path("small.pt")], "cannot take --weights"),
    "weights/classifier-not-safetensors": (
        lambda m: ["fid", str(m.images), str(m.images), "--extractor", DOMAIN_EXTRACTOR, "--weights",
                   m.path("not-npz.npz")], "not a saved domain classifier"),
    "weights/classifier-metadata-not-json": (
        lambda m: ["fid", str(m.images), str(m.images), "--extractor", DOMAIN_EXTRACTOR, "--weights",
                   m.path("clf-bad-meta.safetensors")], "its metadata does not say so"),
    "weights/classifier-architecture-absurd": (
        lambda m: ["fid", str(m.images), str(m.images), "--extractor", DOMAIN_EXTRACTOR, "--weights",
                   m.path("clf-huge.safetensors")], "is not a domain classifier's"),
    "weights/classifier-wrong-shapes": (
        lambda m: ["fid", str(m.images), str(m.images), "--extractor", DOMAIN_EXTRACTOR, "--weights",
                   m.path("clf-shapes.safetensors")], "does not hold the weights its metadata describes"),
    # command-line arguments
    "cli/fid-batch-size-zero": (lambda m: ["fid", str(m.images), str(m.images), *m.extractor(), "--batch-size", "0"],
                                "--batch-size must be in [1, 4096]"),
    "cli/eval-sample-steps-beyond-the-diffusion": (
        lambda m: ["eval", str(m.checkpoint), "--no-tracking", *m.extractor(), "--sample-steps", "100000000"],
        "--sample-steps=100000000 is more than 1000"),
    "cli/eval-num-samples-absurd": (
        lambda m: ["eval", str(m.checkpoint), "--no-tracking", *m.extractor(), "--num-samples", str(10**14)],
        "--num-samples=100000000000000 is more than"),
    "cli/eval-num-samples-negative": (lambda m: ["eval", str(m.checkpoint), "--num-samples", "-5"],
                                      "--num-samples must be >= 2"),
    "cli/eval-tail-drop-outside": (lambda m: ["eval", str(m.checkpoint), "--tail-drop", "1.5"], "[0, 1)"),
    "cli/eval-unknown-metric": (lambda m: ["eval", str(m.checkpoint), "--metrics", "fid,foo"], "unknown metric"),
    "cli/eval-sweep-not-numbers": (lambda m: ["eval", str(m.checkpoint), "--tail-drop-sweep", "a,b"],
                                   "comma-separated numbers"),
    "cli/train-override-without-value": (lambda m: ["train", "experiments/smoke.yaml", "-o", "nokey"],
                                         "must look like section.key=value"),
    "cli/train-override-unknown-key": (lambda m: ["train", "experiments/smoke.yaml", "-o", "model.nope=1"],
                                       "unknown config key 'model.nope'"),
    "cli/train-override-nan": (lambda m: ["train", "experiments/smoke.yaml", "-o", "train.lr=.nan",
                                          "--storage", m.path("runs")], "must be finite"),
    "cli/train-name-traversal": (lambda m: ["train", "experiments/smoke.yaml", "--name", "../etc"],
                                 "is not a valid run name"),
    "cli/resume-name-traversal": (lambda m: ["resume", "../../etc", "--storage", m.path("runs")],
                                  "is not a valid run name"),
    "cli/resume-unknown-run": (lambda m: ["resume", "nosuch", "--storage", m.path("runs")], "no run named nosuch"),
    "cli/train-storage-scheme": (lambda m: ["train", "experiments/smoke.yaml", "--storage", "ftp://x/y"],
                                 "unsupported scheme"),
    "cli/train-tracking-file-store": (lambda m: ["train", "experiments/smoke.yaml", "--tracking-uri",
                                                 "file:///tmp/x"], "file store is disabled"),
    "cli/fid-unknown-extractor": (lambda m: ["fid", str(m.images), str(m.images), "--extractor", "incepton"],
                                  "unknown feature extractor"),
    "cli/fid-missing-input": (lambda m: ["fid", m.path("nowhere"), str(m.images), *m.extractor()], "nowhere"),
    "cli/data-info-missing": (lambda m: ["data-info", m.path("nowhere")], "is not a dataset"),
    # prepared datasets
    "shards/path-traversal": (lambda m: ["data-info", m.path("datasets", "traversal"), "--verify"],
                              "../../outside/shard-00000.parquet"),
    "shards/absolute-path": (lambda m: ["data-info", m.path("datasets", "absolute"), "--verify"], "outside"),
    "shards/huge-shape": (lambda m: ["data-info", m.path("datasets", "huge-shape"), "--verify"], "shape"),
    "shards/negative-bytes": (lambda m: ["data-info", m.path("datasets", "negative-bytes"), "--verify"], "bytes"),
    "shards/absurd-classes": (lambda m: ["data-info", m.path("datasets", "classes-absurd"), "--verify"],
                              "num_classes"),
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


def test_a_summary_with_a_non_finite_number_is_refused_not_printed(capsys):
    from dcdit.errors import DCDiTError
    from dcdit_platform.console import print_json

    with pytest.raises(DCDiTError, match=r"non-finite numbers \(metrics.fd, sweep\[1\].kid\)"):
        print_json({"metrics": {"fd": float("nan"), "ok": 1.0}, "sweep": [{"kid": 0.1}, {"kid": float("inf")}]})
    assert capsys.readouterr().out == ""
    print_json({"fd": 1.5})
    assert json.loads(capsys.readouterr().out) == {"fd": 1.5}
