"""`dcdit prepare-data` (images or synthetic -> shards, optionally VAE latents) and `dcdit data-info`."""

from __future__ import annotations

import argparse
import sys

from dcdit_platform.console import print_json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare-data", help="write a dataset as Parquet shards (pixels, or VAE latents with --vae)",
        description="SOURCE is 'synthetic' or an image folder in ImageNet layout (class subfolders). DEST is a "
                    "local path or s3://bucket/prefix (endpoint and keys from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, "
                    "AWS_SECRET_ACCESS_KEY, or --endpoint-url). Re-running after an interruption skips finished "
                    "shards.")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("dest", metavar="DEST")
    p.add_argument("--num-samples", type=int, default=None,
                   help="synthetic: how many (default 10000); folder: a seeded random subset (default all)")
    p.add_argument("--vae", metavar="NAME_OR_DIR", default=None,
                   help="encode with this diffusers AutoencoderKL (local dir or hub name, e.g. "
                        "stabilityai/sd-vae-ft-ema); without it, uint8 pixels are stored")
    p.add_argument("--image-size", type=int, default=None,
                   help="synthetic: the image side; folder: the side of the ADM centre crop (default 16, the size "
                        "every shipped config trains at; 256 for ImageNet-256)")
    p.add_argument("--num-classes", type=int, default=10, help="synthetic only (default 10)")
    p.add_argument("--seed", type=int, default=0, help="synthetic images, folder subset and VAE noise (default 0)")
    p.add_argument("--shard-size", type=int, default=1024, help="samples per shard (default 1024)")
    p.add_argument("--batch-size", type=int, default=64, help="VAE encode batch per actor (default 64)")
    p.add_argument("--workers", type=int, default=None,
                   help="VAE/writer actors (default: one per GPU, else CPUs - 1)")
    p.add_argument("--max-shards", type=int, default=None,
                   help="write at most this many new shards and stop; a later run continues")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (default: AWS_ENDPOINT_URL)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print a one-line JSON summary")
    p.set_defaults(func=prepare_data)

    p = subparsers.add_parser("data-info", help="describe a prepared dataset; --verify checks every shard",
                              description="Prints sample count, shards, shape, dtype and classes of the dataset "
                                          "at PATH (local or s3://).")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--verify", action="store_true", help="read every shard and check its sha256 and rows")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (default: AWS_ENDPOINT_URL)")
    p.add_argument("--json", action="store_true", help="print a one-line JSON summary")
    p.set_defaults(func=data_info)


def _storage_options(args: argparse.Namespace) -> dict | None:
    return {"endpoint_url": args.endpoint_url} if args.endpoint_url else None


def prepare_data(args: argparse.Namespace) -> int:
    from dcdit_platform.prepare import PrepareConfig, prepare_dataset

    sized = {"image_size": args.image_size} if args.image_size is not None else {}  # else PrepareConfig's default
    config = PrepareConfig(
        source=args.source, dest=args.dest, num_samples=args.num_samples, **sized, vae=args.vae, seed=args.seed,
        num_classes=args.num_classes, shard_size=args.shard_size, encode_batch_size=args.batch_size,
        num_actors=args.workers, max_shards=args.max_shards, storage_options=_storage_options(args))
    summary = prepare_dataset(config, progress=not args.no_progress)
    if args.json:
        print_json(summary)
    elif summary["complete"]:
        print(f"{summary['dest']}: {summary['num_samples']} samples in {summary['shards']} shards "
              f"({summary['written']} written, {summary['skipped']} already done), {summary['layout']} "
              f"{'x'.join(map(str, summary['shape']))} {summary['dtype']}, {summary['seconds']:.1f}s")
    else:
        print(f"{summary['dest']}: {summary['shards_done']} of {summary['shards']} shards done "
              f"({summary['written']} written now); run the same command again to finish")
    return 0


def data_info(args: argparse.Namespace) -> int:
    from dcdit.data.shards import open_dataset
    from dcdit_platform.storage import open_storage

    storage = open_storage(args.path, _storage_options(args))
    dataset = open_dataset(storage.root, filesystem=storage.filesystem, name=storage.uri)
    if args.verify:
        dataset.verify()
    m = dataset.manifest
    summary = {
        "path": storage.uri, "num_samples": m.num_samples, "num_shards": len(m.shards),
        "bytes": sum(s.bytes for s in m.shards), "layout": m.layout, "axes": m.axes, "shape": list(m.shape),
        "dtype": m.dtype, "num_classes": m.num_classes, "class_names": list(m.class_names),
        "has_masks": m.mask_shape is not None, "source": m.source, "verified": bool(args.verify),
    }
    if args.json:
        print_json(summary)
        return 0
    source = ", ".join(f"{k}={v}" for k, v in m.source.items() if k != "fingerprint")
    names = ", ".join(m.class_names[:12]) + (", ..." if m.num_classes > 12 else "")
    lines = [
        f"dataset  {storage.uri}",
        f"samples  {m.num_samples} in {len(m.shards)} shards ({summary['bytes'] / 2**20:.1f} MiB)",
        f"data     {m.layout} {m.axes} {'x'.join(map(str, m.shape))} {m.dtype}"
        + (" + detail masks" if m.mask_shape else ""),
        f"classes  {m.num_classes}: {names}",
        f"source   {source}",
    ]
    if args.verify:
        lines.append(f"verified {len(m.shards)} shards: sizes, sha256, rows and indices match the manifest")
    print("\n".join(lines), file=sys.stdout)
    return 0
