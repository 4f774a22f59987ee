"""Storage URIs -> filesystems: local paths and `s3://bucket/prefix` (s3fs wrapped as a pyarrow filesystem).

The one place the platform touches files that may live remotely: datasets, checkpoints, evaluation outputs.
Writes of whole files are atomic (a reader sees the old file or the new one); directories are committed by
writing their manifest last. Unreachable storage is a one-line DCDiTError that never contains credentials.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import uuid
from dataclasses import asdict, dataclass, fields
from typing import Any

import botocore.exceptions
import pyarrow.fs as pafs
import s3fs

from dcdit.errors import DCDiTError, did_you_mean

MANIFEST_NAME = "MANIFEST.json"


@dataclass(frozen=True)
class StorageOptions:
    """S3 settings; unset fields fall back to the standard AWS environment variables."""

    endpoint_url: str | None = None  # AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL; None = AWS itself
    access_key_id: str | None = None  # AWS_ACCESS_KEY_ID
    secret_access_key: str | None = None  # AWS_SECRET_ACCESS_KEY
    session_token: str | None = None  # AWS_SESSION_TOKEN
    region: str | None = None  # AWS_REGION / AWS_DEFAULT_REGION
    anonymous: bool = False  # public buckets
    connect_timeout: float = 10.0
    max_attempts: int = 3

    @classmethod
    def coerce(cls, options: StorageOptions | dict | None) -> StorageOptions:
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        known = {f.name for f in fields(cls)}
        for key in options:
            if key not in known:
                raise DCDiTError(f"unknown storage option '{key}'{did_you_mean(key, known)}; "
                                 f"known: {', '.join(sorted(known))}")
        return cls(**options)

    def __repr__(self) -> str:  # never print secrets
        shown = {k: v for k, v in asdict(self).items() if k not in ("secret_access_key", "session_token")}
        return f"StorageOptions({shown})"

    @property
    def resolved_endpoint(self) -> str | None:
        return self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def open_storage(uri: str, options: StorageOptions | dict | None = None) -> Storage:
    """A `Storage` rooted at `uri`: a local path, `file:///path` or `s3://bucket[/prefix]`."""
    if not uri:
        raise DCDiTError("empty storage URI: pass a local path or s3://bucket/prefix")
    opts = StorageOptions.coerce(options)
    if uri.startswith("s3://"):
        bucket_and_prefix = uri[len("s3://"):].strip("/")
        if not bucket_and_prefix:
            raise DCDiTError(f"storage URI {uri} names no bucket: use s3://bucket/prefix")
        return Storage(f"s3://{bucket_and_prefix}", _s3_filesystem(opts), bucket_and_prefix, opts)
    if "://" in uri and not uri.startswith("file://"):
        scheme = uri.split("://", 1)[0]
        raise DCDiTError(f"unsupported storage scheme '{scheme}://' in {uri}: use a local path, file:// or s3://")
    path = os.path.abspath(os.path.expanduser(uri[len("file://"):] if uri.startswith("file://") else uri))
    return Storage(path, pafs.LocalFileSystem(), path, opts)


def _s3_filesystem(opts: StorageOptions) -> pafs.FileSystem:
    client_kwargs: dict[str, Any] = {}
    region = opts.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        client_kwargs["region_name"] = region
    fs = s3fs.S3FileSystem(
        anon=opts.anonymous,
        key=opts.access_key_id, secret=opts.secret_access_key, token=opts.session_token,
        endpoint_url=opts.resolved_endpoint,
        client_kwargs=client_kwargs,
        config_kwargs={"connect_timeout": opts.connect_timeout,
                       "retries": {"max_attempts": opts.max_attempts, "mode": "standard"}},
        # Other processes (Ray actors, other ranks) write here too: never trust a cached listing.
        use_listings_cache=False, skip_instance_cache=True,
    )
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def _error_types() -> tuple[type[BaseException], ...]:
    return (OSError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)


class StorageError(DCDiTError):
    """Storage refused or failed an operation; `transient` when waiting may fix it (see `is_transient`)."""

    def __init__(self, message: str, *, transient: bool):
        super().__init__(message)
        self.transient = transient


# Local errors an operator can clear without changing the run: a read-only or full filesystem, lost permissions,
# I/O errors, and network filesystems that time out or drop the connection.
_TRANSIENT_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN,
                     errno.EBUSY, errno.ETIMEDOUT, errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH,
                     errno.ENETUNREACH, errno.ESTALE}
_TRANSIENT_S3_CODES = {"SlowDown", "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable",
                       "Throttling", "ThrottlingException", "RequestLimitExceeded"}


def is_transient(err: BaseException) -> bool:
    """Whether waiting may fix a storage error, by exception type, errno and HTTP status (never by message text):
    connection failures and timeouts, S3 answers 408/429/5xx and its throttling codes, and the local errnos above.
    Follows the chain of causes (s3fs and pyarrow wrap botocore's errors in OSError)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (botocore.exceptions.ConnectionError, botocore.exceptions.ConnectTimeoutError,
                            botocore.exceptions.ReadTimeoutError, ConnectionError, TimeoutError)):
            return True
        if isinstance(err, botocore.exceptions.ClientError):
            meta = err.response.get("ResponseMetadata", {})
            status = int(meta.get("HTTPStatusCode") or 0)
            return status in (408, 429) or status >= 500 or err.response.get("Error", {}).get("Code") in \
                _TRANSIENT_S3_CODES
        if isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS:
            return True
        err = err.__cause__ or err.__context__
    return False


class Storage:
    """A root directory on some filesystem; paths in methods are relative to it ('' = the root itself).

    `.filesystem` and `.root` give pyarrow users (Parquet, Ray Train's `storage_filesystem`) direct access.
    """

    def __init__(self, uri: str, filesystem: pafs.FileSystem, root: str, options: StorageOptions):
        self.uri = uri
        self.filesystem = filesystem
        self.root = root
        self.options = options
        self.is_local = isinstance(filesystem, pafs.LocalFileSystem)

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    def __reduce__(self):  # travel to Ray workers by URI; the filesystem is rebuilt there
        return (open_storage, (self.uri, self.options))

    # --- paths -------------------------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """Path of `parts` inside `.filesystem`."""
        rel = "/".join(p.strip("/") for p in parts if p and p.strip("/"))
        if ".." in rel.split("/"):
            raise DCDiTError(f"storage path {rel!r} leaves {self.uri}")
        return f"{self.root.rstrip('/')}/{rel}" if rel else self.root

    def join(self, *parts: str) -> str:
        """URI of `parts` below the root."""
        rel = self.path(*parts)[len(self.root):]
        return self.uri + rel

    def child(self, *parts: str) -> Storage:
        """A Storage rooted at `parts` below this one (same filesystem)."""
        return Storage(self.join(*parts), self.filesystem, self.path(*parts), self.options)

    # --- errors ------------------------------------------------------------------------------------------------
    def _fail(self, action: str, rel: str, err: BaseException) -> StorageError:
        text = " ".join(str(err).split())[:200] or type(err).__name__
        for secret in (self.options.secret_access_key, self.options.session_token, self.options.access_key_id,
                       os.environ.get("AWS_SECRET_ACCESS_KEY"), os.environ.get("AWS_SESSION_TOKEN")):
            if secret:
                text = text.replace(secret, "***")
        where = self.join(rel) if rel else self.uri
        if self.is_local:
            hint = "check the path and its permissions"
        else:
            endpoint = self.options.resolved_endpoint or "AWS default"
            hint = (f"check the endpoint ({endpoint}; AWS_ENDPOINT_URL), the credentials "
                    "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) and that the bucket exists")
        return StorageError(f"cannot {action} {where}: {text}; {hint}", transient=is_transient(err))

    def _call(self, action: str, rel: str, fn, *args):
        try:
            return fn(*args)
        except FileNotFoundError:
            raise
        except _error_types() as err:
            raise self._fail(action, rel, err) from None

    # --- queries -----------------------------------------------------------------------------------------------
    def check(self) -> Storage:
        """Raise a DCDiTError now if the storage cannot be reached (bucket missing, endpoint down, bad keys)."""
        if self.is_local:
            return self
        bucket = self.root.split("/", 1)[0]
        try:
            info = self._call("reach", "", self.filesystem.get_file_info, bucket)
        except FileNotFoundError as err:
            raise self._fail("reach", "", err) from None
        if info.type == pafs.FileType.NotFound:
            raise self._fail("reach", "", FileNotFoundError(f"bucket '{bucket}' does not exist"))
        return self

    def info(self, rel: str = "") -> pafs.FileInfo:
        return self._call("stat", rel, self.filesystem.get_file_info, self.path(rel))

    def exists(self, rel: str = "") -> bool:
        return self.info(rel).type != pafs.FileType.NotFound

    def isdir(self, rel: str = "") -> bool:
        return self.info(rel).type == pafs.FileType.Directory

    def size(self, rel: str) -> int:
        info = self.info(rel)
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(self.join(rel))
        return int(info.size)

    def listdir(self, rel: str = "") -> list[str]:
        """Names directly below `rel`, sorted; [] when it does not exist."""
        selector = pafs.FileSelector(self.path(rel), allow_not_found=True, recursive=False)
        try:
            infos = self._call("list", rel, self.filesystem.get_file_info, selector)
        except FileNotFoundError:
            return []
        return sorted(info.base_name for info in infos)

    # --- reading and writing -----------------------------------------------------------------------------------
    def open_input(self, rel: str):
        """A pyarrow input stream (a context manager with .read())."""
        return self._call("read", rel, self.filesystem.open_input_stream, self.path(rel))

    def open_input_file(self, rel: str):
        """A seekable pyarrow input file (for Parquet footers, partial reads)."""
        return self._call("read", rel, self.filesystem.open_input_file, self.path(rel))

    def open_output(self, rel: str):
        """A pyarrow output stream. Not atomic: prefer `write_bytes` or commit with a manifest."""
        self.makedirs(_parent(rel))
        return self._call("write", rel, self.filesystem.open_output_stream, self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        def read():
            with self.filesystem.open_input_stream(self.path(rel)) as f:
                return f.read()

        return self._call("read", rel, read)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Atomically replace `rel` with `data`: readers never see a partial file."""
        self.makedirs(_parent(rel))
        if self.is_local:
            self._call("write", rel, _write_local_atomic, self.path(rel), data)
        else:
            # An S3 object appears only once its upload completes, so a direct PUT is already atomic.
            def put():
                with self.filesystem.open_output_stream(self.path(rel)) as f:
                    f.write(data)

            self._call("write", rel, put)

    def read_json(self, rel: str) -> Any:
        raw = self.read_bytes(rel)
        try:
            return json.loads(raw)
        except ValueError:
            raise DCDiTError(f"{self.join(rel)} is not valid JSON") from None

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

    def sha256(self, rel: str) -> str:
        digest = hashlib.sha256()

        def read():
            with self.filesystem.open_input_stream(self.path(rel)) as f:
                while chunk := f.read(8 << 20):
                    digest.update(chunk)

        self._call("read", rel, read)
        return digest.hexdigest()

    def makedirs(self, rel: str = "") -> None:
        self._call("create", rel, lambda: self.filesystem.create_dir(self.path(rel), recursive=True))

    def delete(self, rel: str = "", *, missing_ok: bool = True) -> None:
        """Delete a file or a whole directory (recursively)."""
        info = self.info(rel)
        if info.type == pafs.FileType.NotFound:
            if missing_ok:
                return
            raise FileNotFoundError(self.join(rel))
        if info.type == pafs.FileType.Directory:
            self._call("delete", rel, self.filesystem.delete_dir, self.path(rel))
        else:
            self._call("delete", rel, self.filesystem.delete_file, self.path(rel))

    def upload(self, local_path: str, rel: str = "") -> None:
        """Copy a local file or directory (recursively) to `rel`."""
        if not os.path.exists(local_path):
            raise DCDiTError(f"cannot upload {local_path}: it does not exist")
        if os.path.isdir(local_path):
            self.makedirs(rel)
        self._call("write", rel, pafs.copy_files, os.path.abspath(local_path), self.path(rel),
                   pafs.LocalFileSystem(), self.filesystem)

    def download(self, rel: str, local_path: str) -> None:
        """Copy the file or directory `rel` (recursively) to a local path."""
        os.makedirs(os.path.dirname(os.path.abspath(local_path)) or ".", exist_ok=True)
        self._call("read", rel, pafs.copy_files, self.path(rel), os.path.abspath(local_path),
                   self.filesystem, pafs.LocalFileSystem())

    # --- directory commits -------------------------------------------------------------------------------------
    def commit_manifest(self, rel_dir: str, files: list[str], extra: dict | None = None,
                        name: str = MANIFEST_NAME) -> dict:
        """Commit directory `rel_dir`: hash its `files` and write the manifest last. Returns the manifest."""
        manifest = {**(extra or {}), "files": {f: {"sha256": self.sha256(_join(rel_dir, f)),
                                                    "bytes": self.size(_join(rel_dir, f))} for f in sorted(files)}}
        self.write_json(_join(rel_dir, name), manifest)
        return manifest

    def verify_manifest(self, rel_dir: str, name: str = MANIFEST_NAME) -> dict:
        """The manifest of a committed directory after checking every file; DCDiTError naming the first bad one."""
        where = self.join(rel_dir)
        try:
            manifest = self.read_json(_join(rel_dir, name))
        except FileNotFoundError:
            raise DCDiTError(f"{where} is not committed: no {name} (an interrupted write leaves none)") from None
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict):
            raise DCDiTError(f"{where}/{name} lists no files")
        for f, entry in sorted(files.items()):
            try:
                ok = self.size(_join(rel_dir, f)) == entry["bytes"] and \
                    self.sha256(_join(rel_dir, f)) == entry["sha256"]
            except FileNotFoundError:
                raise DCDiTError(f"{where}/{f} is missing (listed in {name})") from None
            if not ok:
                raise DCDiTError(f"{where}/{f} is corrupt: size or sha256 differs from {name}")
        return manifest


def _join(a: str, b: str) -> str:
    return f"{a.rstrip('/')}/{b}" if a else b


def _parent(rel: str) -> str:
    return rel.rsplit("/", 1)[0] if "/" in rel.strip("/") else ""


def _write_local_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
