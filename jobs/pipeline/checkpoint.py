"""The run's checkpoint: its two files fetched once by the driver and validated (``Checkpoint``); the
scoring actors get only what survives a restart, its URI and hashes (``CheckpointRef``), and load it
through a cache on their node keyed by those hashes: the first actor on a node fetches it, the others
(and a restarted one) read the node's copy, every load checked against the hashes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from jobs.pipeline.options import JobError
from jobs.storage import StorageError, Store, join

if TYPE_CHECKING:
    from nrm.config import ModelConfig
    from nrm.model import NRM


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint's files in memory, so actors on any node can load it without shared storage."""

    uri: str
    files: dict[str, bytes]  # nrm.checkpoint.CONFIG and WEIGHTS -> their bytes
    model_id: str
    config: ModelConfig  # parsed and validated by fetch

    @property
    def config_sha256(self) -> str:
        """sha256 of config.json: the fitted state (threshold, detector, ...) that model_id, a hash of
        the weights alone, does not cover."""
        from nrm.checkpoint import CONFIG

        return hashlib.sha256(self.files[CONFIG]).hexdigest()

    @classmethod
    def fetch(cls, store: Store, uri: str) -> Checkpoint:
        """Read and validate the checkpoint at ``uri`` (config, shapes, finiteness and the hash) before any work."""
        from nrm.checkpoint import CONFIG, WEIGHTS, CheckpointError, load_bytes, weights_id

        files = {}
        for name in (CONFIG, WEIGHTS):
            try:
                files[name] = store.read_bytes(join(uri, name))
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                raise JobError(f"checkpoint {uri!r} has no {name} (expected a directory or prefix holding "
                               f"{CONFIG} and {WEIGHTS})") from None
            except StorageError as e:
                raise JobError(f"cannot read checkpoint {uri!r}: {e}") from None
        try:
            config = load_bytes(files[CONFIG], files[WEIGHTS], name=uri).config
        except CheckpointError as e:
            raise JobError(str(e)) from None
        return cls(uri, files, weights_id(files[WEIGHTS]), config)

    def load(self, device: str = "cpu") -> NRM:
        """The network on ``device``, its weights checked against ``model_id`` again."""
        from nrm.checkpoint import CONFIG, WEIGHTS, load_bytes

        return load_bytes(self.files[CONFIG], self.files[WEIGHTS], device, expect_model_id=self.model_id, name=self.uri)

    def ref(self, store: Store) -> CheckpointRef:
        """What a scoring actor is handed: the URI and hashes (a few hundred bytes, never the files),
        with this node's cache already holding the files."""
        ref = CheckpointRef(store, self.uri, self.model_id, self.config_sha256)
        ref.put(self.files)
        return ref


CACHE_ENV = "NRM_OOD_CHECKPOINT_CACHE"  # the node-local cache directory (default: <tmp>/nrm-ood-checkpoints)


@dataclass(frozen=True)
class CheckpointRef:
    """A checkpoint by URI and hashes: loaded through the node's cache, fetched from ``uri`` on a miss."""

    store: Store
    uri: str
    model_id: str  # sha256 of the weights (nrm.checkpoint.weights_id)
    config_sha256: str

    @property
    def cache_dir(self) -> str:
        root = os.environ.get(CACHE_ENV) or os.path.join(tempfile.gettempdir(), "nrm-ood-checkpoints")
        return os.path.join(root, f"{self.model_id[:32]}-{self.config_sha256[:32]}")

    def load(self, device: str = "cpu") -> NRM:
        """The network on ``device`` from this node's copy (fetched into it first on a miss, or when the
        copy fails its hashes). Raises JobError when ``uri`` cannot be read or no longer matches."""
        from nrm.checkpoint import CONFIG, WEIGHTS, CheckpointError, load_bytes

        with self._locked():
            files = self._cached()
            if files is None:
                files = self._fetch()
                self._write(files)
        try:
            return load_bytes(files[CONFIG], files[WEIGHTS], device, expect_model_id=self.model_id, name=self.uri)
        except CheckpointError as e:
            raise JobError(str(e)) from None

    def put(self, files: dict[str, bytes]) -> None:
        """Seed this node's cache with files already fetched and checked (the driver's)."""
        with self._locked():
            if self._cached() is None:
                self._write(files)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One process at a time fills or checks the cache entry (actors on a node start together)."""
        os.makedirs(os.path.dirname(self.cache_dir), exist_ok=True)
        with open(self.cache_dir + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _cached(self) -> dict[str, bytes] | None:
        """The cached files if present and matching both hashes; a copy that does not match is removed."""
        from nrm.checkpoint import CONFIG, WEIGHTS, weights_id

        try:
            files = {n: Path(self.cache_dir, n).read_bytes() for n in (CONFIG, WEIGHTS)}
        except OSError:
            return None
        if hashlib.sha256(files[CONFIG]).hexdigest() == self.config_sha256 and weights_id(files[WEIGHTS]) == self.model_id:
            return files
        shutil.rmtree(self.cache_dir, ignore_errors=True)
        return None

    def _fetch(self) -> dict[str, bytes]:
        from nrm.checkpoint import CONFIG, WEIGHTS, weights_id

        try:
            files = {n: self.store.read_bytes(join(self.uri, n)) for n in (CONFIG, WEIGHTS)}
        except (OSError, StorageError) as e:
            raise JobError(f"cannot read checkpoint {self.uri!r} on this node ({e}); a multi-node run needs the "
                           "checkpoint on storage every node reads (S3 or a shared file system)") from None
        if hashlib.sha256(files[CONFIG]).hexdigest() != self.config_sha256 or weights_id(files[WEIGHTS]) != self.model_id:
            raise JobError(f"checkpoint {self.uri!r} changed during the run (its hashes differ from model_id "
                           f"{self.model_id[:12]}); score again to use the new one")
        return files

    def _write(self, files: dict[str, bytes]) -> None:
        """The files into the cache entry atomically (a temp directory renamed into place)."""
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(self.cache_dir))
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        shutil.rmtree(self.cache_dir, ignore_errors=True)
        os.replace(tmp, self.cache_dir)
