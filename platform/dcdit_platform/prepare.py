"""Dataset preparation with Ray Data: images -> ADM centre crop -> (optional) VAE latents -> Parquet shards.

Shard k always holds samples [k*S, (k+1)*S), so the work splits by shard: Ray tasks load and crop a shard's images;
with a VAE a fixed pool of actors (one VAE each) encodes it, otherwise the task writes it directly. Each shard is
followed by a done marker; a re-run skips shards whose marker and file check out, and the manifest goes last.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import ray
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from dcdit.data import shards as shard_format
from dcdit.data.reader import to_model_input
from dcdit.data.synthetic import SyntheticDataset
from dcdit.data.vae import LATENT_SCALE, center_crop_arr, check_vae, encode, load_vae, sample_seed
from dcdit.errors import DCDiTError
from dcdit_platform.config.sections import DEFAULT_IMAGE_SIZE
from dcdit_platform.raycluster import ray_data_settings, ray_session
from dcdit_platform.storage import Storage, StorageOptions, open_storage

PROGRESS_DIR = "_progress"  # per-shard done markers while a preparation is unfinished
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


@dataclass(frozen=True, kw_only=True)
class PrepareConfig:
    """One preparation: what to read, where to write, and how."""

    source: str  # "synthetic", or an image folder in ImageNet layout (class subfolders), local or s3://
    dest: str  # local path or s3:// URI
    num_samples: int | None = None  # synthetic: default 10000; folder: default all (else a seeded subset)
    image_size: int = DEFAULT_IMAGE_SIZE
    vae: str | None = None  # local dir or hub name; None writes uint8 pixels
    seed: int = 0  # synthetic images, folder subset, and the per-sample VAE noise
    num_classes: int = 10  # synthetic only
    shard_size: int = 1024
    encode_batch_size: int = 64
    num_actors: int | None = None  # None: one per GPU, or CPUs - 1 (the rest load images)
    max_shards: int | None = None  # write at most this many new shards, then stop (a later run continues)
    storage_options: dict | None = None

    def validate(self) -> None:
        if self.num_samples is not None and self.num_samples < 1:
            raise DCDiTError(f"--num-samples must be >= 1, got {self.num_samples}")
        if not 8 <= self.image_size <= 4096:
            raise DCDiTError(f"--image-size must be in [8, 4096], got {self.image_size}")
        if self.shard_size < 1:
            raise DCDiTError(f"--shard-size must be >= 1, got {self.shard_size}")
        if self.encode_batch_size < 1:
            raise DCDiTError(f"--batch-size must be >= 1, got {self.encode_batch_size}")
        if self.num_actors is not None and self.num_actors < 1:
            raise DCDiTError(f"--workers must be >= 1, got {self.num_actors}")
        if self.seed < 0:
            raise DCDiTError(f"--seed must be >= 0, got {self.seed}")


# --- sources -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    """Everything that fixes the dataset's content; its hash is the fingerprint that markers must match."""

    kind: str  # "synthetic" | "folder"
    num_samples: int
    class_names: tuple[str, ...]
    files: tuple[str, ...] = ()  # folder: relative paths of the chosen images, in sample order
    labels: tuple[int, ...] = ()

    def describe(self, config: PrepareConfig) -> dict:
        source = {"kind": self.kind, "image_size": config.image_size, "seed": config.seed,
                  "num_samples": self.num_samples, "shard_size": config.shard_size}
        if self.kind == "synthetic":
            source["num_classes"] = config.num_classes
        else:
            source["path"] = config.source
            source["crop"] = "adm_center_crop"
        if config.vae:
            source.update(vae=config.vae, latent_scale=LATENT_SCALE, noise="N(0,1) per sample, seeded by "
                          "SeedSequence([seed, index])")
        files_hash = hashlib.sha256("\n".join(f"{f}\t{y}" for f, y in zip(self.files, self.labels)).encode())
        body = {**source, "format_version": shard_format.FORMAT_VERSION, "files": files_hash.hexdigest()}
        source["fingerprint"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
        return source


def _plan(config: PrepareConfig) -> _Plan:
    if config.source == "synthetic":
        data = SyntheticDataset(config.num_samples or 10_000, image_size=config.image_size,
                                num_classes=config.num_classes, seed=config.seed)
        return _Plan("synthetic", len(data), tuple(data.class_names))
    src = open_storage(config.source, config.storage_options).check()
    if not src.isdir():
        raise DCDiTError(f"source {config.source} is neither 'synthetic' nor an image folder")
    classes = [c for c in src.listdir() if not c.startswith(".") and src.isdir(c)]
    if not classes:
        raise DCDiTError(f"image folder {config.source} has no class subfolders (expected ImageNet layout: "
                         "SOURCE/<class>/<image>)")
    files, labels = [], []
    for label, name in enumerate(classes):
        for f in src.listdir(name):
            if f.lower().endswith(IMAGE_EXTENSIONS):
                files.append(f"{name}/{f}")
                labels.append(label)
    if not files:
        raise DCDiTError(f"image folder {config.source} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    if config.num_samples is not None:
        if config.num_samples > len(files):
            raise DCDiTError(f"--num-samples {config.num_samples} exceeds the {len(files)} images in {config.source}")
        chosen = np.sort(np.random.default_rng(config.seed).choice(len(files), config.num_samples, replace=False))
        files, labels = [files[i] for i in chosen], [labels[i] for i in chosen]
    return _Plan("folder", len(files), tuple(classes), tuple(files), tuple(labels))


def _load_pixels(config: PrepareConfig, plan: _Plan, start: int, stop: int):
    """(indices, labels, pixels uint8 [n, S, S, 3], masks bool [n, S, S] or None) of samples [start, stop)."""
    indices = np.arange(start, stop, dtype=np.int64)
    if plan.kind == "synthetic":
        batch = SyntheticDataset(plan.num_samples, image_size=config.image_size, num_classes=config.num_classes,
                                 seed=config.seed).render(indices)
        return indices, batch.labels, batch.images, batch.masks
    src = open_storage(config.source, config.storage_options)
    pixels = np.empty((len(indices), config.image_size, config.image_size, 3), dtype=np.uint8)
    for row, i in enumerate(indices):
        rel = plan.files[i]
        try:
            with Image.open(io.BytesIO(src.read_bytes(rel))) as image:
                pixels[row] = center_crop_arr(image, config.image_size)
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise DCDiTError(f"cannot decode image {src.join(rel)} ({type(err).__name__}); remove or replace it") \
                from None
    return indices, np.asarray([plan.labels[i] for i in indices], dtype=np.int64), pixels, None


# --- Ray Data stages ---------------------------------------------------------------------------------------------
# A shard is the unit of work (batch_size=1). A user error inside a stage comes back as an "error" value, not an
# exception: Ray would wrap it in a multi-line remote traceback and lose the original type.
def _load_shard(batch: dict, config: PrepareConfig, plan: _Plan) -> dict:
    """Ray Data task: one shard id -> one row with that shard's samples (pixels [1, n, S, S, 3], ...)."""
    (shard_id,) = batch["shard"]
    start = int(shard_id) * config.shard_size
    try:
        indices, labels, pixels, masks = _load_pixels(config, plan, start,
                                                      min(start + config.shard_size, plan.num_samples))
    except DCDiTError as err:
        return {"shard": np.array([shard_id]), "error": np.array([str(err)], dtype=object)}
    row = {"shard": np.array([shard_id]), "index": indices[None], "label": labels[None], "pixels": pixels[None],
           "error": np.array([""], dtype=object)}
    if masks is not None:
        row["mask"] = masks[None]
    return row


def _write_rows(batch: dict, dest: Storage, source: dict, encode_fn=None) -> dict:
    """Write each row's shard (encoded by `encode_fn` if given), then its done marker; return the markers."""
    markers, errors = [], []
    for row in range(len(batch["shard"])):
        marker, error = "", str(batch["error"][row])
        if not error:
            shard_id, indices, pixels = int(batch["shard"][row]), batch["index"][row], batch["pixels"][row]
            try:
                data = pixels if encode_fn is None else encode_fn(indices, pixels)
                info = shard_format.write_shard(dest.root, shard_id, indices, batch["label"][row], data,
                                                batch["mask"][row] if "mask" in batch else None,
                                                filesystem=dest.filesystem)
                record = {**asdict(info), "fingerprint": source["fingerprint"], "shape": list(data.shape[1:])}
                dest.write_json(_marker(shard_id), record)  # after the shard: a marker vouches for a whole file
                marker = json.dumps(record)
            except DCDiTError as err:
                error = str(err)
            except OSError as err:  # the destination went away mid-run: name it, one line, no remote traceback
                error = (f"cannot write {shard_format.shard_name(shard_id)} to {dest.uri}: "
                         f"{' '.join(str(err).split())[:200]}; check the destination and re-run to resume")
        markers.append(marker)
        errors.append(error)
    return {"marker": np.asarray(markers, dtype=object), "error": np.asarray(errors, dtype=object)}


def _load_and_write(batch: dict, config: PrepareConfig, plan: _Plan, source: dict) -> dict:
    """Ray Data task for pixel datasets: load, crop and write a shard (stateless, so plain tasks)."""
    dest = open_storage(config.dest, config.storage_options)
    return _write_rows(_load_shard(batch, config, plan), dest, source)


class _EncodeAndWrite:
    """Ray Data actor for latent datasets: holds one VAE for the whole run; encodes and writes shards."""

    def __init__(self, config: PrepareConfig, source: dict, use_gpu: bool):
        self.config, self.source = config, source
        self.dest = open_storage(config.dest, config.storage_options)
        self.vae = load_vae(config.vae, device="cuda" if use_gpu and torch.cuda.is_available() else "cpu")

    def __call__(self, batch: dict) -> dict:
        return _write_rows(batch, self.dest, self.source, self._encode)

    def _encode(self, indices: np.ndarray, pixels: np.ndarray) -> np.ndarray:
        """Latents float16, each sample's noise seeded by (seed, index): equal on re-runs and any actor."""
        out = []
        for lo in range(0, len(indices), self.config.encode_batch_size):
            hi = lo + self.config.encode_batch_size
            seeds = [sample_seed(self.config.seed, int(i)) for i in indices[lo:hi]]
            with torch.inference_mode():
                out.append(encode(self.vae, to_model_input(pixels[lo:hi], "pixels"), seeds).cpu().numpy())
        return np.concatenate(out).astype(np.float16)


def _marker(shard_id: int) -> str:
    return f"{PROGRESS_DIR}/{shard_format.shard_name(shard_id)}.json"


# --- driver ------------------------------------------------------------------------------------------------------
def _finished_shards(dest: Storage, fingerprint: str, expected_rows: dict[int, int]) -> dict[int, dict]:
    """Markers of shards that are complete: fingerprint, rows, size and sha256 all match."""
    names = set(dest.listdir(PROGRESS_DIR))

    def check(shard_id: int) -> dict | None:
        if f"{shard_format.shard_name(shard_id)}.json" not in names:
            return None
        try:
            marker = dest.read_json(_marker(shard_id))
            ok = (marker.get("fingerprint") == fingerprint and marker.get("rows") == expected_rows[shard_id]
                  and dest.size(marker["file"]) == marker["bytes"] and dest.sha256(marker["file"]) == marker["sha256"])
        except (FileNotFoundError, KeyError, DCDiTError):
            return None
        return marker if ok else None

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = pool.map(check, list(expected_rows))
    return {shard_id: m for shard_id, m in zip(expected_rows, results) if m is not None}


def _cleanup_temporaries(dest: Storage) -> None:
    for name in dest.listdir():
        if ".tmp-" in name:
            dest.delete(name)


def prepare_dataset(config: PrepareConfig, *, progress: bool = True) -> dict:
    """Run (or finish) a preparation; returns a summary. Starts a local Ray instance if none is running."""
    config.validate()
    if config.vae:
        check_vae(config.vae)  # a missing model fails here, in one line, before any work starts
    plan = _plan(config)
    source = plan.describe(config)
    dest = open_storage(config.dest, config.storage_options).check()
    started = time.perf_counter()

    if dest.exists(shard_format.MANIFEST_NAME):
        existing = shard_format.read_manifest(dest.root, filesystem=dest.filesystem, name=dest.uri)
        if existing.source.get("fingerprint") != source["fingerprint"]:
            raise DCDiTError(f"{dest.uri} already holds a different dataset ({existing.num_samples} samples, "
                             f"source {existing.source.get('kind')}); choose a new destination or delete it")
        return _summary(dest, existing, written=0, skipped=len(existing.shards), complete=True, started=started)

    num_shards = -(-plan.num_samples // config.shard_size)
    rows = {k: min(config.shard_size, plan.num_samples - k * config.shard_size) for k in range(num_shards)}
    _cleanup_temporaries(dest)
    done = _finished_shards(dest, source["fingerprint"], rows)
    todo = [k for k in range(num_shards) if k not in done]
    if config.max_shards is not None:
        todo = todo[: config.max_shards]
    if todo:
        done.update(_run_pipeline(config, plan, source, todo, rows, progress=progress))
    written = len(todo)

    if len(done) < num_shards:  # stopped early on purpose (max_shards): no manifest yet
        return {"dest": dest.uri, "complete": False, "num_samples": plan.num_samples, "shards": num_shards,
                "shards_done": len(done), "written": written, "skipped": len(done) - written,
                "seconds": round(time.perf_counter() - started, 3)}
    markers = [done[k] for k in range(num_shards)]
    shapes = {tuple(m["shape"]) for m in markers}
    if len(shapes) != 1:
        raise DCDiTError(f"shards in {dest.uri} disagree on the sample shape {sorted(shapes)}; delete {dest.uri} "
                         "and prepare again")
    manifest = shard_format.Manifest(
        layout="latents" if config.vae else "pixels", shape=shapes.pop(), num_classes=len(plan.class_names),
        class_names=plan.class_names, source=source,
        shards=tuple(shard_format.ShardInfo(**{k: m[k] for k in ("file", "rows", "first_index", "sha256", "bytes")})
                     for m in markers),
        mask_shape=(config.image_size, config.image_size) if plan.kind == "synthetic" else None)
    shard_format.write_manifest(dest.root, manifest, filesystem=dest.filesystem)
    dest.delete(PROGRESS_DIR)
    return _summary(dest, manifest, written=written, skipped=num_shards - written, complete=True, started=started)


def _summary(dest: Storage, manifest, *, written: int, skipped: int, complete: bool, started: float) -> dict:
    return {"dest": dest.uri, "complete": complete, "num_samples": manifest.num_samples,
            "shards": len(manifest.shards), "written": written, "skipped": skipped, "layout": manifest.layout,
            "shape": list(manifest.shape), "dtype": manifest.dtype, "num_classes": manifest.num_classes,
            "seconds": round(time.perf_counter() - started, 3)}


def _run_pipeline(config: PrepareConfig, plan: _Plan, source: dict, todo: list[int], rows: dict[int, int], *,
                  progress: bool) -> dict[int, dict]:
    with ray_session(log_to_driver=False), ray_data_settings():  # one bar of our own, counting samples
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
        ds = ray.data.from_items([{"shard": k} for k in todo], override_num_blocks=len(todo))
        if config.vae:
            # Loader tasks feed a fixed pool of actors that each keep one VAE for the whole run: one per GPU,
            # or on CPUs all but one (the loaders need somewhere to run).
            use_gpu = gpus > 0
            actors = min(config.num_actors or (gpus if use_gpu else max(1, cpus - 1)), len(todo))
            ds = ds.map_batches(_load_shard, fn_kwargs={"config": config, "plan": plan}, batch_size=1,
                                num_cpus=1, udf_modifying_row_count=False)
            ds = ds.map_batches(_EncodeAndWrite, fn_constructor_args=(config, source, use_gpu), batch_size=1,
                                compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=0.5 if use_gpu else 1,
                                num_gpus=1 if use_gpu else 0, udf_modifying_row_count=False)
        else:
            ds = ds.map_batches(_load_and_write, fn_kwargs={"config": config, "plan": plan, "source": source},
                                batch_size=1, num_cpus=1, udf_modifying_row_count=False,
                                compute=ray.data.TaskPoolStrategy(size=config.num_actors or cpus))
        done: dict[int, dict] = {}
        with tqdm(total=sum(rows[k] for k in todo), unit="img", desc=f"prepare {len(todo)} shards",
                  disable=not progress, file=sys.stderr) as bar:
            for row in ds.iter_rows():
                if row["error"]:
                    raise DCDiTError(row["error"])
                marker = json.loads(row["marker"])
                done[int(marker["first_index"]) // config.shard_size] = marker
                bar.update(marker["rows"])
        return done


def open_source(source: str, *, storage_options: StorageOptions | dict | None = None, num_samples: int = 10_000,
                image_size: int = DEFAULT_IMAGE_SIZE, num_classes: int = 10, seed: int = 0, **reader_options):
    """A training source from a spec: 'synthetic' (rendered on the fly) or a prepared dataset's URI."""
    if source == "synthetic":
        return SyntheticDataset(num_samples, image_size=image_size, num_classes=num_classes, seed=seed)
    storage = open_storage(source, storage_options)
    return shard_format.open_dataset(storage.root, filesystem=storage.filesystem, name=storage.uri, **reader_options)
