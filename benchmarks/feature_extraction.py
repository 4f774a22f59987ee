"""Feature-extraction throughput of the evaluator versus torch-fidelity on the same images, and 1 vs 2 Ray workers.

    .venv/bin/python benchmarks/feature_extraction.py [--images 64] [--size 32] [--threads 1] [--repeats 2]
                                                      [--weights PATH]

Rows (images/s, best of --repeats, after a warm-up batch):
1. in memory, one process: torch-fidelity's pipeline (`get_featuresdict_from_dataset` over uint8 tensors with its
   Inception, layers 2048 + logits_unbiased, then its np.cov statistics) versus this evaluator's (`Extractor`:
   2048 + logits_unbiased + the sFID spatial map, float64 sufficient statistics for pool and spatial features);
2. from a PNG folder, one process: torch-fidelity's `ImagesPathDataset` pipeline versus `dcdit fid`'s reader;
3. the Ray evaluator's shard path (`ActorPool` of `EvalWorker`s extracting reference shards), 1 and 2 actors with
   --threads threads each, actor start-up excluded.
Ratios: ours / torch-fidelity (goal: >= 0.9, i.e. overhead <= 10%) and 2 / 1 workers (scaling).
Without --weights the real Inception weights are used if cached, else a seeded random stand-in with the same
architecture (the speed does not depend on the weights' values).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "platform"))


def best_of(repeats: int, fn) -> float:
    """Best wall time of `repeats` calls of fn()."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=32, help="image side before the extractor's 299 resize")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process / actor")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--weights", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from torch_fidelity.datasets import ImagesPathDataset
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.metric_fid import fid_features_to_statistics
    from torch_fidelity.utils import get_featuresdict_from_dataset

    from dcdit.data.synthetic import render
    from dcdit.features import build_extractor, inception_cache_path
    from dcdit.metrics import FeatureStats
    from dcdit_platform.evaluate import fid_input, prepare_extractor

    work = Path(tempfile.mkdtemp(prefix="dcdit-bench-features-"))
    weights = args.weights or (str(inception_cache_path()) if inception_cache_path().is_file() else None)
    if weights is None:
        from eval_support import random_inception_weights

        weights = random_inception_weights(str(work))
        print("(real Inception weights not cached: timing a seeded random stand-in of the same architecture)")
    images_nhwc = render(np.arange(args.images), image_size=args.size, num_classes=10).images
    images = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).contiguous()

    theirs_net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                             feature_extractor_weights_path=weights)
    ours = build_extractor(weights=weights, batch_size=args.batch)
    theirs_net(images[:2])
    ours(images[:2])  # warm-up: oneDNN primitives, allocator

    class Tensors(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return images[i]

    def theirs_memory():
        feats = get_featuresdict_from_dataset(Tensors(), theirs_net, args.batch, False, True, False)
        fid_features_to_statistics(feats["2048"])

    def ours_memory():
        feats = ours(images)
        FeatureStats.from_features(feats["pool"])
        FeatureStats.from_features(feats["spatial"])

    folder = work / "png"
    folder.mkdir()
    from PIL import Image

    for i, image in enumerate(images_nhwc):
        Image.fromarray(image).save(folder / f"{i:06d}.png")
    files = sorted(str(p) for p in folder.glob("*.png"))

    def theirs_folder():
        feats = get_featuresdict_from_dataset(ImagesPathDataset(files), theirs_net, args.batch, False, True, False)
        fid_features_to_statistics(feats["2048"])

    spec, _ = prepare_extractor("inception-v3-compat", weights)

    def ours_folder():
        fid_input(str(folder), ours, spec, batch_size=args.batch)

    rows = []
    n = args.images
    t_theirs = best_of(args.repeats, theirs_memory)
    t_ours = best_of(args.repeats, ours_memory)
    rows.append(("in memory, 1 process", n / t_theirs, n / t_ours, t_theirs / t_ours))
    t_theirs_f = best_of(args.repeats, theirs_folder)
    t_ours_f = best_of(args.repeats, ours_folder)
    rows.append(("PNG folder, 1 process", n / t_theirs_f, n / t_ours_f, t_theirs_f / t_ours_f))

    scaling = ray_scaling(spec, images_nhwc, args)

    print(f"\nfeature extraction, {n} images of {args.size}x{args.size} -> 299x299, batch {args.batch}, "
          f"{args.threads} torch thread(s) per process, {os.cpu_count()} CPUs, best of {args.repeats}")
    print(f"{'':28}{'torch-fidelity img/s':>22}{'dcdit img/s':>14}{'ratio':>9}")
    for name, a, b, r in rows:
        print(f"{name:28}{a:22.2f}{b:14.2f}{r:9.3f}")
    print(f"{'':28}{'1 worker img/s':>22}{'2 workers img/s':>16}{'ratio':>7}")
    print(f"{'Ray actors (shards)':28}{scaling[0]:22.2f}{scaling[1]:16.2f}{scaling[1] / scaling[0]:7.3f}")


def ray_scaling(spec, images_nhwc: np.ndarray, args) -> tuple[float, float]:
    import ray
    from dataclasses import replace

    from dcdit_platform.evaluate import ActorPool, EvalWorker, ImageSource, shards_of

    ray.init(num_cpus=max(2, args.threads * 2), log_to_driver=False, logging_level="error")
    try:
        spec = replace(spec, blob=ray.put(Path(spec.weights_path).read_bytes()))
        source = ImageSource("array", {"array": ray.put(images_nhwc)}, {"kind": "bench"}, len(images_nhwc), "bench")
        shard = max(args.batch, len(images_nhwc) // 8)
        tasks = [{"kind": "extract", "shard": i, "source": source, "indices": np.arange(a, b),
                  "batch_size": args.batch, "return": ()} for i, (a, b) in enumerate(shards_of(len(images_nhwc),
                                                                                               shard))]
        rates = []
        for workers in (1, 2):
            remote = ray.remote(EvalWorker).options(num_cpus=args.threads)
            pool = ActorPool(workers, lambda: remote.remote(spec, None, args.threads))
            list(pool.run(tasks[:workers]))  # warm-up: every actor extracts once
            seconds = best_of(args.repeats, lambda: list(pool.run(tasks)))
            rates.append(len(images_nhwc) / seconds)
            pool.shutdown()
        return rates[0], rates[1]
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
