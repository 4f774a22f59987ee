"""Storage URIs: local folders and a real S3-compatible server (moto on 127.0.0.1), atomic writes, commits."""

from __future__ import annotations

import os
import pickle
import time

import numpy as np
import pytest
import torch

from dcdit.data import DataReader, SyntheticDataset, open_dataset, write_dataset
from dcdit.errors import DCDiTError
from dcdit_platform.storage import StorageOptions, open_storage


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return open_storage(str(tmp_path / "store"))
    s3 = request.getfixturevalue("s3_server")
    return open_storage(s3.uri("store")).check()


def test_files_directories_and_json(storage):
    assert not storage.exists("a/b.bin")
    storage.write_bytes("a/b.bin", b"hello")
    storage.write_json("a/c.json", {"x": 1})
    assert storage.read_bytes("a/b.bin") == b"hello" and storage.read_json("a/c.json") == {"x": 1}
    assert storage.exists("a/b.bin") and storage.isdir("a") and storage.size("a/b.bin") == 5
    assert storage.listdir("a") == ["b.bin", "c.json"]  # no temporaries left behind
    assert storage.listdir("missing") == []
    storage.write_bytes("a/b.bin", b"replaced")
    assert storage.read_bytes("a/b.bin") == b"replaced"
    with storage.open_output("d/e.txt") as f:
        f.write(b"stream")
    with storage.open_input("d/e.txt") as f:
        assert f.read() == b"stream"
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("nope.bin")
    storage.delete("a")
    assert not storage.exists("a/b.bin") and storage.exists("d/e.txt")
    child = storage.child("d")
    assert child.read_bytes("e.txt") == b"stream" and child.uri == storage.join("d")
    assert pickle.loads(pickle.dumps(child)).read_bytes("e.txt") == b"stream"  # how it travels to Ray workers


def test_upload_download_and_manifest_commit(storage, tmp_path):
    src = tmp_path / "ckpt"
    (src / "sub").mkdir(parents=True)
    (src / "model.bin").write_bytes(os.urandom(1000))
    (src / "sub" / "state.json").write_text('{"step": 3}')
    storage.upload(str(src), "run/ckpt")
    manifest = storage.commit_manifest("run/ckpt", ["model.bin", "sub/state.json"], {"step": 3})
    assert manifest["step"] == 3 and storage.verify_manifest("run/ckpt") == manifest
    storage.download("run/ckpt", str(tmp_path / "back"))
    assert (tmp_path / "back" / "model.bin").read_bytes() == (src / "model.bin").read_bytes()
    storage.write_bytes("run/ckpt/model.bin", b"x" * 1000)
    with pytest.raises(DCDiTError, match=r"run/ckpt/model.bin is corrupt"):
        storage.verify_manifest("run/ckpt")
    storage.delete("run/ckpt/MANIFEST.json")
    with pytest.raises(DCDiTError, match="not committed: no MANIFEST.json"):
        storage.verify_manifest("run/ckpt")


def test_dataset_round_trip_through_local_and_s3(storage):
    """Shards written through a Storage's pyarrow filesystem read back identically, also through the reader."""
    src = SyntheticDataset(80, seed=9)
    write_dataset(storage.path("ds"), src, filesystem=storage.filesystem, shard_size=32)
    ds = open_dataset(storage.path("ds"), filesystem=storage.filesystem, name=storage.join("ds"))
    assert len(ds.verify()) == 3
    data, labels = ds.read(np.arange(80))
    want, want_labels = src.read(np.arange(80))
    np.testing.assert_array_equal(data, want)
    np.testing.assert_array_equal(labels, want_labels)
    from_shards = [b for b in DataReader(ds, batch_size=16, seed=2, epochs=1)]
    from_memory = [b for b in DataReader(src, batch_size=16, seed=2, epochs=1)]
    for a, b in zip(from_shards, from_memory):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


def test_s3_errors_are_one_line_and_keep_secrets(s3_server):
    with pytest.raises(DCDiTError) as info:
        open_storage(f"s3://no-such-bucket-{os.getpid()}/x").check()
    message = str(info.value)
    assert "does not exist" in message and "AWS_ENDPOINT_URL" in message and "\n" not in message
    assert s3_server.env["AWS_SECRET_ACCESS_KEY"] not in message

    start = time.perf_counter()
    closed = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(DCDiTError) as info:
        open_storage("s3://bucket/x", {"endpoint_url": closed, "max_attempts": 1, "connect_timeout": 1,
                                       "secret_access_key": "s3cr3t-value"}).check()
    message = str(info.value)
    assert message.startswith("cannot reach s3://bucket/x") and closed in message and "\n" not in message
    assert "s3cr3t-value" not in message
    assert time.perf_counter() - start < 15
    assert "s3cr3t-value" not in repr(StorageOptions(secret_access_key="s3cr3t-value"))


def _closed_port() -> int:
    import socket

    with socket.socket() as s:  # bound and released: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_uris_and_options_are_validated(tmp_path):
    with pytest.raises(DCDiTError, match="unsupported storage scheme 'gs://'"):
        open_storage("gs://bucket/x")
    with pytest.raises(DCDiTError, match="names no bucket"):
        open_storage("s3://")
    with pytest.raises(DCDiTError, match="unknown storage option 'endpoint'.*did you mean 'endpoint_url'"):
        open_storage("s3://b/x", {"endpoint": "http://x"})
    local = open_storage(f"file://{tmp_path}/a")
    assert local.is_local and local.root == f"{tmp_path}/a" and local.filesystem.type_name == "local"
    with pytest.raises(DCDiTError, match="leaves"):
        local.path("../etc")


def test_s3_storage_gives_pyarrow_users_filesystem_and_root(s3_server):
    storage = open_storage(f"s3://{s3_server.bucket}/prefix/run")
    assert storage.root == f"{s3_server.bucket}/prefix/run"  # what Ray Train's storage_path takes (no s3://)
    storage.write_bytes("x.txt", b"1")
    with storage.filesystem.open_input_stream(f"{storage.root}/x.txt") as f:
        assert f.read() == b"1"


def test_transient_storage_errors_are_told_by_type_errno_and_status_not_by_text(tmp_path, s3_server):
    import errno

    import botocore.exceptions

    from dcdit_platform.raycluster import free_port
    from dcdit_platform.storage import StorageError, is_transient

    def client_error(status: int, code: str) -> botocore.exceptions.ClientError:
        return botocore.exceptions.ClientError(
            {"Error": {"Code": code, "Message": "503 Service Unavailable"}, "ResponseMetadata": {"HTTPStatusCode":
                                                                                                  status}}, "PutObject")

    assert is_transient(client_error(503, "ServiceUnavailable")) and is_transient(client_error(429, "Whatever"))
    assert is_transient(client_error(400, "SlowDown"))  # S3's throttling code, whatever the status
    assert not is_transient(client_error(403, "AccessDenied"))  # "503" in its message does not make it transient
    assert is_transient(OSError(errno.EROFS, "Read-only file system"))
    assert is_transient(OSError(errno.ENOSPC, "No space left on device"))
    assert not is_transient(OSError(errno.ENAMETOOLONG, "File name too long (503)"))
    wrapped = OSError("s3fs says so")
    wrapped.__cause__ = botocore.exceptions.EndpointConnectionError(endpoint_url="http://x")
    assert is_transient(wrapped)

    # From real components: a bucket that does not exist (permanent), an endpoint nobody listens on (transient).
    with pytest.raises(StorageError) as missing:
        open_storage(f"s3://no-such-bucket-{os.getpid()}/x").write_bytes("a", b"x")
    assert not missing.value.transient
    with pytest.raises(StorageError) as down:
        open_storage("s3://dcdit-test/x", {"endpoint_url": f"http://127.0.0.1:{free_port()}", "max_attempts": 1,
                                           "connect_timeout": 1}).write_bytes("a", b"x")
    assert down.value.transient
