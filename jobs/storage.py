"""Where data lives: local paths or s3:// URIs, through pyarrow.fs (Parquet) and boto3 (objects).

Credentials, region and endpoint come from the standard AWS environment variables and profiles
(AWS_ENDPOINT_URL included: pyarrow and boto3 both honour it); ``--endpoint-url`` overrides the
endpoint for S3-compatible stores. A ``Store`` holds no secret, so it can travel to Ray tasks: each
worker builds its own clients from its own environment.
"""

from __future__ import annotations

import fnmatch
import functools
import glob
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs


class StorageError(RuntimeError):
    """A path, bucket or object that cannot be used; the message names it. Never holds a secret."""


class AlreadyCommitted(StorageError):
    """A create-if-absent write found the object already there."""


# S3 error codes that mean the credentials themselves were refused (not a policy denial).
CREDENTIAL_CODES = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken")


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} is not an s3://bucket/key URI")
    return bucket, key


def local_path(uri: str) -> str:
    """A local URI (plain path or file://) as an absolute path."""
    return os.path.abspath(uri[len("file://"):] if uri.startswith("file://") else uri)


def glob_match(path: str, pattern: str) -> bool:
    """fnmatch per path component, so '*' never crosses '/' (as a local glob); '**' spans components."""
    p, q = path.split("/"), pattern.split("/")
    if "**" in q:
        i = q.index("**")
        head, tail = q[:i], q[i + 1 :]
        return (len(p) >= len(head) + len(tail) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(p, head, strict=False))
                and all(fnmatch.fnmatchcase(a, b) for a, b in zip(p[len(p) - len(tail):], tail, strict=False)))
    return len(p) == len(q) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(p, q, strict=True))


def hidden(relative: str) -> bool:
    """Hidden or temporary by convention: any component starting with '_' or '.' (e.g. _temporary/, .staging/)."""
    return any(part.startswith(("_", ".")) for part in relative.split("/") if part)


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for p in parts:
        out += "/" + p.strip("/")
    return out


CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def _env_key() -> tuple[int, str]:
    """What a cached client depends on besides endpoint and region: the process (clients do not survive a
    fork) and the credentials in the environment (hashed, so the cache key holds no secret)."""
    creds = "\0".join(os.environ.get(k, "") for k in CREDENTIAL_ENV)
    return os.getpid(), hashlib.sha256(creds.encode()).hexdigest()


@functools.lru_cache(maxsize=8)
def _s3_client(endpoint: str | None, region: str | None, _env: tuple[int, str]) -> Any:
    import boto3
    from botocore.config import Config

    cfg = Config(retries={"mode": "standard", "max_attempts": 8}, connect_timeout=10, read_timeout=60,
                 max_pool_connections=32,  # the footer thread pool shares this client
                 request_checksum_calculation="when_required", response_checksum_validation="when_required")
    return boto3.session.Session(region_name=region).client("s3", endpoint_url=endpoint, config=cfg)


@functools.lru_cache(maxsize=8)
def _s3fs(endpoint: str | None, region: str | None, _env: tuple[int, str]) -> pafs.S3FileSystem:
    kw: dict[str, Any] = {
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=8),
        "connect_timeout": 10,
        "request_timeout": 60,
    }
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kw.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    if region:
        kw["region"] = region
    return pafs.S3FileSystem(**kw)


@dataclass(frozen=True)
class FileInfo:
    uri: str
    size: int
    version: str  # S3 ETag, or local mtime in ns: what makes a file "the same file" for --incremental


@dataclass(frozen=True)
class Store:
    endpoint_url: str | None = None
    region: str | None = None

    # ------------------------------------------------------------------ clients
    @property
    def _endpoint(self) -> str | None:
        return self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")

    def s3fs(self) -> pafs.S3FileSystem:
        region = self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return _s3fs(self._endpoint, region, _env_key())

    def s3(self) -> Any:
        """boto3 S3 client, one per (endpoint, region, process): boto3 clients are thread-safe, and
        building a session and client costs milliseconds that add up over thousands of files."""
        return _s3_client(self._endpoint, self.region, _env_key())

    def filesystem(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """The pyarrow filesystem and in-filesystem path for ``uri``."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            return self.s3fs(), f"{bucket}/{key}".rstrip("/")
        return pafs.LocalFileSystem(), local_path(uri)

    def read_tail(self, uri: str, n: int) -> bytes:
        """The last ``n`` bytes of an object (all of it if shorter): one ranged GET on S3, no HEAD."""
        if not is_s3(uri):
            with open(local_path(uri), "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - n))
                return f.read()
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = split_s3(uri)
        try:
            return self.s3().get_object(Bucket=bucket, Key=key, Range=f"bytes=-{n}")["Body"].read()  # type: ignore[no-any-return,unused-ignore]
        except ClientError as e:
            raise StorageError(f"cannot read {uri!r}: {e.response.get('Error', {}).get('Code', '') or e}") from None
        except BotoCoreError as e:
            raise StorageError(f"cannot read {uri!r}: {e}") from None

    # ------------------------------------------------------------------ listing
    def check_bucket(self, uri: str) -> None:
        """Fail with one clear sentence if the bucket of an s3 URI is missing or not reachable."""
        if not is_s3(uri):
            return
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        bucket, _ = split_s3(uri)
        try:
            self.s3().head_bucket(Bucket=bucket)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchBucket"):
                raise StorageError(f"bucket {bucket!r} does not exist (from {uri!r})") from None
            if code in CREDENTIAL_CODES:
                raise StorageError(f"access to bucket {bucket!r} denied: check the AWS credentials ({code})") from None
            if code in ("403", "AccessDenied"):
                # HeadBucket needs an unconditioned s3:ListBucket, which a prefix-scoped policy denies; a HEAD
                # 403 has no body, so ask once more with a GET whose error code tells bad credentials apart.
                try:
                    self.s3().list_objects_v2(Bucket=bucket, Prefix=split_s3(uri)[1], MaxKeys=1)
                except ClientError as e2:
                    code2 = e2.response.get("Error", {}).get("Code", "")
                    if code2 in CREDENTIAL_CODES:
                        raise StorageError(f"access to bucket {bucket!r} denied: check the AWS credentials "
                                           f"({code2})") from None
                return
            raise StorageError(f"bucket {bucket!r}: {code or e}") from None
        except NoCredentialsError:
            raise StorageError(f"no AWS credentials found to read bucket {bucket!r}") from None
        except EndpointConnectionError as e:
            raise StorageError(f"cannot reach the S3 endpoint for bucket {bucket!r}: {e}") from None

    def list_parquet(self, uri: str) -> list[FileInfo]:
        """Parquet files named by ``uri``: a file, a directory/prefix (recursive), or a glob. Sorted."""
        has_glob = any(ch in uri for ch in "*?[")
        if is_s3(uri):
            out = self._list_s3_parquet(uri, has_glob)
        else:
            path = local_path(uri)
            if has_glob:
                paths = [p for p in glob.glob(path, recursive=True) if os.path.isfile(p) and not hidden(os.path.basename(p))]
            elif os.path.isdir(path):
                paths = [str(p) for p in Path(path).rglob("*.parquet")
                         if p.is_file() and not hidden(str(p.relative_to(path)))]
            elif os.path.isfile(path):
                paths = [path]
            else:
                raise StorageError(f"input path {uri!r} does not exist")
            out = []
            for p in paths:
                st = os.stat(p)
                out.append(FileInfo(os.path.abspath(p), st.st_size, str(st.st_mtime_ns)))
        if not out:
            raise StorageError(f"no .parquet files found at {uri!r}")
        return sorted(out, key=lambda f: f.uri)

    def _list_s3_parquet(self, uri: str, has_glob: bool) -> list[FileInfo]:
        """One paginated ListObjectsV2 under the URI's fixed prefix; its size and ETag are all a FileInfo
        needs (no HEAD per object). A key equal to the URI is the file itself; otherwise it is a prefix."""
        self.check_bucket(uri)
        bucket, key = split_s3(uri)
        base = key.split("*")[0].split("?")[0].split("[")[0] if has_glob else key
        base_dir = base.rsplit("/", 1)[0] if has_glob and "/" in base else ("" if has_glob else base)
        objects = self.list_objects(bucket, base_dir.rstrip("/") if has_glob else key)
        if not has_glob:
            exact = [o for o in objects if o[0] == key]
            if exact and not key.endswith("/"):
                objects = exact
            else:  # a prefix: only keys below it as a directory ("d" lists d/..., never dx/...)
                objects = [o for o in objects if o[0].startswith(key.rstrip("/") + "/") or not key]
        objects = [o for o in objects if o[0].endswith(".parquet")]
        if has_glob:
            objects = [o for o in objects if glob_match(o[0], key)]
        root = base_dir.rstrip("/") if has_glob else key.rstrip("/")
        objects = [o for o in objects if o[0] == key or not hidden(o[0][len(root):])]
        return [FileInfo(f"s3://{bucket}/{k}", size, etag) for k, size, etag in objects]

    def list_objects(self, bucket: str, prefix: str) -> list[tuple[str, int, str]]:
        """(key, size, ETag) of every object under ``prefix``: one paginated listing, 1,000 keys a request."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            pages = self.s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            return [(o["Key"], int(o["Size"]), o["ETag"].strip('"')) for p in pages for o in p.get("Contents", [])]
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            raise StorageError(f"cannot list s3://{bucket}/{prefix}: {code or e}") from None
        except BotoCoreError as e:
            raise StorageError(f"cannot list s3://{bucket}/{prefix}: {e}") from None

    # ------------------------------------------------------------------ objects
    def read_bytes(self, uri: str) -> bytes:
        if is_s3(uri):
            from botocore.exceptions import ClientError

            bucket, key = split_s3(uri)
            try:
                return self.s3().get_object(Bucket=bucket, Key=key)["Body"].read()  # type: ignore[no-any-return,unused-ignore]
            except ClientError as e:
                code = e.response.get("Error", {}).get("Code", "")
                if code in ("NoSuchKey", "404"):
                    raise FileNotFoundError(uri) from None
                if code in CREDENTIAL_CODES:
                    raise StorageError(f"cannot read {uri!r}: the AWS credentials were refused ({code})") from None
                if code == "NoSuchBucket":
                    raise StorageError(f"cannot read {uri!r}: bucket {bucket!r} does not exist") from None
                raise StorageError(f"cannot read {uri!r}: {code}") from None
        return Path(local_path(uri)).read_bytes()

    def put_if_absent(self, uri: str, data: bytes, content_type: str = "application/json") -> None:
        """Create ``uri`` holding ``data`` only if nothing is there: S3 conditional put
        (If-None-Match '*'), locally an atomic hard link of a complete temp file. Raises AlreadyCommitted."""
        if is_s3(uri):
            from botocore.exceptions import ClientError

            bucket, key = split_s3(uri)
            try:
                self.s3().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*", ContentType=content_type)
            except ClientError as e:
                code = e.response.get("Error", {}).get("Code", "")
                if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                    # A retried put whose first try landed but whose answer was lost also gets 412: same bytes
                    # (they name this attempt's own output files) mean the object is ours.
                    if code in ("PreconditionFailed", "412") and self._holds(uri, data):
                        return
                    raise AlreadyCommitted(f"{uri} already exists") from None
                raise StorageError(f"cannot write {uri!r}: {code}") from None
            return
        path = Path(local_path(uri))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # atomic, and fails if the target exists (rename would overwrite)
            except FileExistsError:
                raise AlreadyCommitted(f"{uri} already exists") from None
        finally:
            os.unlink(tmp)

    def _holds(self, uri: str, data: bytes) -> bool:
        try:
            return self.read_bytes(uri) == data
        except (FileNotFoundError, StorageError):
            return False

    def list_dirs(self, uri: str, must_exist: bool = False) -> list[str]:
        """Immediate sub-directories (prefixes) of ``uri``; [] if it does not exist, unless ``must_exist``."""
        infos = self._list(uri, must_exist)
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def list_names(self, uri: str) -> list[str]:
        """Names of the files (objects) directly under ``uri``; [] if it does not exist. One listing."""
        return sorted(i.base_name for i in self._list(uri, False) if i.type == pafs.FileType.File)

    def _list(self, uri: str, must_exist: bool) -> list[pafs.FileInfo]:
        fs, path = self.filesystem(uri)
        for _ in range(3):
            try:
                return fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=not must_exist))
            except FileNotFoundError:  # the directory, or an entry a concurrent writer just renamed, vanished
                if must_exist and fs.get_file_info(path).type == pafs.FileType.NotFound:
                    raise StorageError(f"{uri!r} does not exist") from None
            except OSError as e:
                raise StorageError(f"cannot list {uri!r}: {e}") from None
        raise StorageError(f"cannot list {uri!r}: its entries kept changing while being listed")

    def delete_dir(self, uri: str) -> None:
        fs, path = self.filesystem(uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)

    def read_json(self, uri: str) -> dict[str, Any]:
        return json.loads(self.read_bytes(uri))  # type: ignore[no-any-return,unused-ignore]


def absolute(uri: str) -> str:
    """``uri`` with a local path (plain or file://) made absolute; s3:// URIs unchanged. Manifests record
    these, so they name the same data from any working directory."""
    return uri if is_s3(uri) else local_path(uri)
