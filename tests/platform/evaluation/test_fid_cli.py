"""`dcdit fid`: equal to torch-fidelity's own FID on the same folders and weights (Inception stand-in weights, since
the real ones cannot be downloaded here), the same number from folders, sample npz files and statistics files,
FD naming for the domain classifier, the one-line error for missing weights, and the offline default extractors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch_fidelity import calculate_metrics
from torch_fidelity.datasets import ImagesPathDataset
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.utils import get_featuresdict_from_dataset

from dcdit.data.synthetic import render
from dcdit.features import DOMAIN_EXTRACTOR, INCEPTION_WEIGHTS_FILE, build_extractor
from dcdit_platform.cli import main
from helpers.evaluation import write_png_folder

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # not a declared dependency; only makes the comparison faster on a busy machine
    import contextlib

    def threadpool_limits(_limit):
        return contextlib.nullcontext()


pytestmark = pytest.mark.usefixtures("one_thread")  # in-process feature comparisons with one intra-op thread


def run_json(capsys, *argv: str) -> dict:
    capsys.readouterr()
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def test_fid_equals_torch_fidelity_on_the_same_folders(tmp_path, inception_weights, capsys):
    a = write_png_folder(tmp_path / "a", render(np.arange(5), seed=0, image_size=16, num_classes=4).images)
    b = write_png_folder(tmp_path / "b", render(np.arange(5), seed=7, image_size=16, num_classes=2).images)
    ours = run_json(capsys, "fid", str(a), str(b), "--weights", inception_weights, "--json")
    assert set(ours) >= {"fid", "sfid", "n1", "n2", "weights_sha256"} and "fd" not in ours
    assert ours["n1"] == ours["n2"] == 5
    assert any("biased" in w for w in ours["warnings"])  # 5 samples in 2048 dimensions
    with threadpool_limits(1):  # numpy's eigvals of a 2048 x 2048 matrix: two threads only fight the other tests
        theirs = calculate_metrics(input1=str(a), input2=str(b), fid=True, cuda=False, cache=False, verbose=False,
                                   save_cpu_ram=True, feature_extractor_weights_path=inception_weights)
    # With 5 samples in 2048 dimensions S1 S2 has rank 4 and ~2044 eigenvalues of pure rounding noise, whose
    # square roots torch-fidelity adds up (about 1e-5 relative here); this evaluator cuts the spectra at rank n - 1.
    assert rel(ours["fid"], theirs["frechet_inception_distance"]) < 2e-5

    # torch-fidelity's own pipeline (file loading, batching, extractor) gives bit-identical features, and on them
    # our FID is the exact value: tr sqrt(S1 S2) = nuclear norm of Xc Yc^T / (n - 1), computed from the samples.
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                      feature_extractor_weights_path=inception_weights)
    theirs_x, theirs_y = (get_featuresdict_from_dataset(ImagesPathDataset(sorted(map(str, d.glob("*.png")))), net,
                                                        64, False, True, False) for d in (a, b))
    extractor = build_extractor(weights=inception_weights)
    ours_x, ours_y = (extractor(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in sorted(d.glob("*.png"))]))
                      for d in (a, b))
    assert torch.equal(ours_x["pool"], theirs_x["2048"]) and torch.equal(ours_y["logits"], theirs_y["logits_unbiased"])
    assert ours_x["spatial"].shape == (5, 17 * 17 * 7)
    x, y = theirs_x["2048"].double().numpy(), theirs_y["2048"].double().numpy()
    xc, y_c = x - x.mean(0), y - y.mean(0)
    nuclear = np.linalg.svd(xc @ y_c.T, compute_uv=False).sum() / 4
    exact = ((x.mean(0) - y.mean(0)) ** 2).sum() + (xc**2).sum() / 4 + (y_c**2).sum() / 4 - 2 * nuclear
    assert rel(ours["fid"], exact) < 1e-9


def test_folders_npz_and_statistics_give_the_same_fd(tmp_path, domain_classifier, capsys):
    real = render(np.arange(300), seed=0, image_size=8, num_classes=4).images
    fake = render(np.arange(300), seed=3, image_size=8, num_classes=3).images
    a, b = write_png_folder(tmp_path / "a", real), write_png_folder(tmp_path / "b", fake)
    common = ["--extractor", DOMAIN_EXTRACTOR, "--weights", domain_classifier, "--json"]
    folders = run_json(capsys, "fid", str(a), str(b), *common, "--save-stats", str(tmp_path / "a_stats.npz"))
    assert "fd" in folders and "fid" not in folders  # never call a non-Inception distance FID
    assert "warnings" not in folders  # 300 samples in 128 dimensions: full-rank covariances
    theirs = calculate_metrics(input1=str(a), input2=str(b), fid=True, cuda=False, cache=False, verbose=False,
                               save_cpu_ram=True, feature_extractor=DOMAIN_EXTRACTOR,
                               feature_extractor_weights_path=domain_classifier)
    assert rel(folders["fd"], theirs["frechet_inception_distance"]) < 1e-6

    np.savez(tmp_path / "a.npz", arr_0=real, arr_1=np.arange(300) % 4)
    from_npz = run_json(capsys, "fid", str(tmp_path / "a.npz"), str(b), *common)
    from_stats = run_json(capsys, "fid", str(tmp_path / "a_stats.npz"), str(b), *common)
    assert from_npz["fd"] == folders["fd"]  # the same images in the same batches
    assert rel(from_stats["fd"], folders["fd"]) < 1e-12
    assert from_stats["n1"] == 300
    # ADM-style statistics (mu and sigma only) work too.
    with np.load(tmp_path / "a_stats.npz") as saved:
        np.savez(tmp_path / "adm.npz", mu=saved["mu"], sigma=saved["sigma"])
    adm = run_json(capsys, "fid", str(tmp_path / "adm.npz"), str(b), *common)
    assert rel(adm["fd"], folders["fd"]) < 1e-9


def test_missing_weights_is_one_line_with_exit_code_2(tmp_path, capsys):
    a = write_png_folder(tmp_path / "a", render(np.arange(2), image_size=8).images)
    assert main(["fid", str(a), str(a), "--weights", str(tmp_path / "missing.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dcdit fid: error:") and INCEPTION_WEIGHTS_FILE in err and len(err.splitlines()) == 1


def test_statistics_of_another_extractor_are_refused(tmp_path, domain_classifier, capsys):
    np.savez(tmp_path / "wrong.npz", mu=np.zeros(10), sigma=np.eye(10))
    a = write_png_folder(tmp_path / "a", render(np.arange(4), image_size=8).images)
    assert main(["fid", str(tmp_path / "wrong.npz"), str(a), "--extractor", DOMAIN_EXTRACTOR,
                 "--weights", domain_classifier]) == 2
    assert "10-dimensional statistics" in capsys.readouterr().err


def test_offline_defaults_pick_the_domain_classifier_for_synthetic_data_and_say_so(tmp_path, monkeypatch):
    from dcdit.features import INCEPTION
    from dcdit_platform.evaluation.extractors import choose_extractor, fid_default_extractor

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no Inception weights in the hub cache
    name, why = fid_default_extractor(None)
    assert name == DOMAIN_EXTRACTOR and "not FID" in why and INCEPTION_WEIGHTS_FILE in why
    assert fid_default_extractor("weights.pth") == (INCEPTION, None)
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / INCEPTION_WEIGHTS_FILE).write_bytes(b"present")
    assert fid_default_extractor(None) == (INCEPTION, None)
    # `dcdit eval`: the domain classifier for synthetic training data, Inception for real data or with --weights.
    synthetic = {"kind": "synthetic", "seed": 0, "image_size": 16, "num_classes": 10, "num_samples": 512}
    name, why = choose_extractor(None, None, synthetic)
    assert name == DOMAIN_EXTRACTOR and why.startswith("synthetic data: FD")
    assert choose_extractor(None, "weights.pth", synthetic) == (INCEPTION, None)
    assert choose_extractor(None, None, None) == (INCEPTION, None)
    assert choose_extractor("vgg16", None, synthetic) == ("vgg16", None)
