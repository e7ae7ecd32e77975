"""The run's checkpoint: its two files fetched once by the driver, validated, and shipped as bytes."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
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
        """The network on ``device``, its weights checked against ``model_id`` again (an actor's copy)."""
        from nrm.checkpoint import CONFIG, WEIGHTS, load_bytes

        return load_bytes(self.files[CONFIG], self.files[WEIGHTS], device, expect_model_id=self.model_id, name=self.uri)
