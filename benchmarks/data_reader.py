"""Reader throughput versus what a 2-worker DC-DiT training step consumes, measured in one run.

    .venv/bin/python benchmarks/data_reader.py [--samples 8192] [--batch 64] [--train-batch 16] [--steps 4]

1. Writes a synthetic pixel dataset (32x32) as Parquet shards to a local folder and to a local S3-compatible
   server (moto on 127.0.0.1), then times the reader alone (one process, like one rank): on-the-fly synthetic,
   local shards, S3 shards, each for a cold first epoch (shards fetched, checked, decoded) and a warm second one.
2. Runs DC-DiT-S (input 32, 3 channels, 10 classes) on 2 DDP workers (gloo, one CPU thread each), each fed by its
   own reader, and times the step (forward, backward, AdamW) and the time each step waited for its batch.
The ratio is reader samples/s over one rank's consumption: above 1 the reader cannot limit training.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dcdit_platform.raycluster import free_port

from dcdit.data import DataReader, SyntheticDataset, open_dataset, write_dataset

S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}


def start_s3() -> tuple[object, str]:
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update({**S3_ENV, "AWS_ENDPOINT_URL": endpoint})
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    return server, endpoint


def open_source(kind: str, local_root: str, s3_uri: str, samples: int):
    """A fresh source (empty shard cache) of the given kind."""
    if kind == "synthetic":
        return SyntheticDataset(samples, seed=0)
    if kind == "local":
        return open_dataset(local_root)
    from dcdit_platform.storage import open_storage

    storage = open_storage(s3_uri)
    return open_dataset(storage.root, filesystem=storage.filesystem, name=storage.uri)


def reader_rate(source, batch: int, epochs: int = 2) -> list[float]:
    """Samples/s for each epoch, consuming as fast as possible from the main thread."""
    reader = DataReader(source, batch_size=batch, seed=0, epochs=epochs)
    rates, count, epoch, start = [], 0, 0, time.perf_counter()
    for b in reader:
        count += len(b.y)
        if reader.cursor["epoch"] != epoch:  # this batch closed the epoch
            rates.append(count / (time.perf_counter() - start))
            count, epoch, start = 0, reader.cursor["epoch"], time.perf_counter()
    return rates


def train_worker(rank: int, world: int, port: int, kind: str, local_root: str, s3_uri: str, samples: int,
                 batch: int, steps: int, results) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Grad strides do not match")  # model-side, reported separately
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    import dcdit

    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(
        dcdit.create_model("DC-DiT-S", input_size=32, in_channels=3, num_classes=10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    alphas = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
    reader = DataReader(open_source(kind, local_root, s3_uri, samples), batch_size=batch, rank=rank,
                        world_size=world, seed=0)
    waits, totals = [], []
    for step in range(steps + 1):  # step 0 warms up (first shard fetch, allocator, autograd graph)
        t0 = time.perf_counter()
        b = next(reader)
        t1 = time.perf_counter()
        t = torch.randint(0, 1000, (batch,))
        noise = torch.randn_like(b.x)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * b.x + (1 - a).sqrt() * noise
        loss = torch.nn.functional.mse_loss(model(x_t, t, b.y)[:, :3], noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        t2 = time.perf_counter()
        if step:
            waits.append(t1 - t0)
            totals.append(t2 - t0)
    reader.close()
    results.put((rank, waits, totals))
    dist.destroy_process_group()


def train_rate(kind: str, local_root: str, s3_uri: str, samples: int, batch: int, steps: int) -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=train_worker, args=(r, 2, port, kind, local_root, s3_uri, samples, batch, steps,
                                                    results)) for r in range(2)]
    for p in procs:
        p.start()
    out = [results.get() for _ in procs]
    for p in procs:
        p.join()
    waits = [w for _, ws, _ in out for w in ws]
    totals = [t for _, _, ts in out for t in ts]
    step_s = statistics.mean(totals)
    return {"step_s": step_s, "wait_ms": 1000 * statistics.mean(waits), "max_wait_ms": 1000 * max(waits),
            "wait_frac": sum(waits) / sum(totals), "per_rank": batch / step_s, "global": 2 * batch / step_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64, help="reader batch for the reader-only timing")
    parser.add_argument("--train-batch", type=int, default=16, help="local batch per training worker")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per worker (after 1 warm-up)")
    args = parser.parse_args()

    server, endpoint = start_s3()
    from dcdit_platform.storage import open_storage

    with tempfile.TemporaryDirectory() as tmp:
        local_root = os.path.join(tmp, "ds")
        src = SyntheticDataset(args.samples, seed=0)
        t = time.perf_counter()
        manifest = write_dataset(local_root, src, shard_size=args.shard_size)
        write_s = time.perf_counter() - t
        s3_uri = "s3://bench/ds"
        s3 = open_storage(s3_uri)
        write_dataset(s3.root, src, filesystem=s3.filesystem, shard_size=args.shard_size)
        size_mb = sum(s.bytes for s in manifest.shards) / 2**20
        print(f"dataset: {args.samples} synthetic 32x32 images, {len(manifest.shards)} shards, {size_mb:.1f} MiB "
              f"(zstd Parquet), rendered+written locally in {write_s:.1f}s; S3 at {endpoint}; "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}", flush=True)

        reader = {}
        for kind in ("synthetic", "local", "s3"):
            reader[kind] = reader_rate(open_source(kind, local_root, s3_uri, args.samples), args.batch)
            print(f"  reader {kind}: " + ", ".join(f"{r:,.0f}" for r in reader[kind]) + " samples/s", flush=True)
        train = {}
        for kind in ("local", "s3"):
            train[kind] = train_rate(kind, local_root, s3_uri, args.samples, args.train_batch, args.steps)
            print(f"  training fed from {kind}: {train[kind]}", flush=True)
    server.stop()

    consume = statistics.mean(tr["per_rank"] for tr in train.values())
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (other processes on this machine slow both sides)")
    print()
    print(f"Training: DC-DiT-S, 2 DDP workers (gloo, 1 thread each), local batch {args.train_batch}: "
          f"{consume:.1f} samples/s per rank, {2 * consume:.1f} samples/s total "
          f"({statistics.mean(tr['step_s'] for tr in train.values()):.2f} s/step)")
    print()
    header = f"{'source':<24}{'epoch':<7}{'reader samples/s':>18}{'per-rank need':>15}{'ratio':>10}"
    print(header)
    print("-" * len(header))
    for kind, label in (("synthetic", "synthetic (on the fly)"), ("local", "local shards"), ("s3", "S3 shards (moto)")):
        for epoch, rate in zip(("cold", "warm"), reader[kind]):
            print(f"{label:<24}{epoch:<7}{rate:>18,.0f}{consume:>15.1f}{rate / consume:>9,.0f}x")
    print()
    header = f"{'reader inside training':<24}{'mean wait ms':>14}{'max wait ms':>13}{'step ms':>10}{'waiting':>10}"
    print(header)
    print("-" * len(header))
    for kind, label in (("local", "local shards"), ("s3", "S3 shards (moto)")):
        tr = train[kind]
        print(f"{label:<24}{tr['wait_ms']:>14.2f}{tr['max_wait_ms']:>13.2f}{1000 * tr['step_s']:>10.0f}"
              f"{100 * tr['wait_frac']:>9.2f}%")


if __name__ == "__main__":
    main()
