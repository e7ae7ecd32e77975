"""Security: checkpoints are safetensors + JSON only (a pickle is never loaded, wherever it is put), and
the AWS credentials never reach stdout, stderr, the output, the manifest or Ray's logs."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pyarrow.parquet as pq
import pytest
import torch
from support import FAKE_KEY_ID, FAKE_SECRET, make_checkpoint, png_bytes, random_images, write_hf_parquet
from typer.testing import CliRunner

import nrm
from jobs.cli import app

EXE = str(Path(sys.executable).with_name("nrm-ood"))
SECRETS = [FAKE_SECRET, FAKE_KEY_ID, quote(FAKE_SECRET, safe="")]


class Evil:
    """Unpickling this creates the file ``path``: the proof that a pickle was loaded."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def evil_pickle(path: Path) -> bytes:
    return pickle.dumps(Evil(path))


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return make_checkpoint(tmp_path / "ckpt")


def test_the_payload_really_fires_when_unpickled(tmp_path: Path) -> None:
    """Control: the pickles below are live; only the checkpoint loader's refusal keeps their marker absent."""
    pickle.loads(evil_pickle(tmp_path / "control"))
    assert (tmp_path / "control").exists()


# ---------------------------------------------------------------------------- pickles are never loaded
@pytest.mark.parametrize("rehash", [False, True], ids=["hash-mismatch", "hash-forged"])
def test_pickle_as_weights_is_refused_clearly_and_never_loaded(ckpt: Path, tmp_path: Path, rehash: bool) -> None:
    marker = tmp_path / "pwned"
    data = evil_pickle(marker)
    (ckpt / "weights.safetensors").write_bytes(data)
    if rehash:  # the attacker also rewrote config.json's recorded hash: loading must still refuse
        cfg = json.loads((ckpt / "config.json").read_text())
        cfg["weights_sha256"] = hashlib.sha256(data).hexdigest()
        (ckpt / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "in").mkdir()
    write_hf_parquet(tmp_path / "in" / "a.parquet", [png_bytes(p) for p in random_images(2)])
    r = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["score", "--model", str(ckpt), "--input", str(tmp_path / "in"),
                                                       "--output", str(tmp_path / "out"), "--run-id", "p"])
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    expected = "is not a safetensors file" if rehash else "(tampered or replaced)"
    assert len(lines) == 1 and expected in lines[0] and str(ckpt) in lines[0], r.stderr
    with pytest.raises(nrm.CheckpointError):
        nrm.load(ckpt)
    assert not marker.exists(), "a pickle was unpickled"
    assert not (tmp_path / "out").exists()


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_pickles_beside_a_valid_checkpoint_are_ignored(ckpt: Path, tmp_path: Path, ray_local: None) -> None:
    marker = tmp_path / "pwned"
    (ckpt / "pytorch_model.bin").write_bytes(evil_pickle(marker))
    torch.save({"state_dict": Evil(marker)}, ckpt / "model.pt")
    (ckpt / "config.json.pkl").write_bytes(evil_pickle(marker))
    model = nrm.load(ckpt)
    assert model.input_shape == (1, 8, 8)
    (tmp_path / "in").mkdir()
    write_hf_parquet(tmp_path / "in" / "a.parquet", [png_bytes(p) for p in random_images(5)])
    r = CliRunner().invoke(app, ["score", "--model", str(ckpt), "--input", str(tmp_path / "in"),
                                 "--output", str(tmp_path / "out"), "--run-id", "p", "--batch-size", "4"])
    assert r.exit_code == 0, r.output
    assert not marker.exists(), "a pickle next to the checkpoint was unpickled"


# ---------------------------------------------------------------------------- secrets never leak
def leaks(blob: bytes) -> list[str]:
    return [s for s in SECRETS if s.encode() in blob]


def scan_tree(root: Path) -> dict[str, list[str]]:
    found = {}
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            blob = p.read_bytes()
            if p.suffix == ".parquet":
                blob += json.dumps(pq.read_table(p).to_pylist(), default=str).encode()
            if hit := leaks(blob):
                found[str(p)] = hit
    return found


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    """A short private RAY_TMPDIR for a CLI subprocess, so its Ray session logs can be scanned whole."""
    d = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def run_cli(args: list[str], ray_tmp: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(ray_tmp)}
    assert env["AWS_SECRET_ACCESS_KEY"] == FAKE_SECRET and env["AWS_ACCESS_KEY_ID"] == FAKE_KEY_ID
    return subprocess.run([EXE, "score", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=280)


def stage(tmp_path: Path) -> Path:
    """A shard with a corrupt row and a truncated shard, so error paths print and record something too."""
    inp = tmp_path / "in"
    inp.mkdir()
    imgs: list[bytes | None] = [png_bytes(p) for p in random_images(6, seed=70)]
    imgs[1] = b"bad"
    write_hf_parquet(inp / "a.parquet", imgs, row_group_size=3)
    (inp / "b.parquet").write_bytes((inp / "a.parquet").read_bytes()[:100])
    return inp


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("where", ["local", "s3"])
def test_credentials_never_reach_logs_outputs_or_errors(where: str, ckpt: Path, tmp_path: Path, moto_server: str,
                                                        s3_bucket: str, ray_tmp: Path) -> None:
    import boto3

    inp = stage(tmp_path)
    if where == "s3":
        client = boto3.client("s3", endpoint_url=moto_server)
        for p in [*inp.iterdir(), *ckpt.iterdir()]:
            client.upload_file(str(p), s3_bucket, f"{p.parent.name}/{p.name}")
        model, input, output = (f"s3://{s3_bucket}/ckpt", f"s3://{s3_bucket}/in", f"s3://{s3_bucket}/out")
    else:
        model, input, output = str(ckpt), str(inp), str(tmp_path / "out")
    r = run_cli(["--model", model, "--input", input, "--output", output, "--run-id", "sec", "--batch-size", "4"],
                ray_tmp, tmp_path)
    assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-2000:]  # the truncated shard makes it incomplete
    assert "failed input" in r.stdout
    missing = run_cli(["--model", model, "--input", input, "--output", "s3://no-such-bucket-nrm/out"], ray_tmp, tmp_path)
    assert missing.returncode == 1 and "no-such-bucket-nrm" in missing.stderr

    assert leaks((r.stdout + r.stderr + missing.stdout + missing.stderr).encode()) == []
    out_dir = tmp_path / "out"
    if where == "s3":
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket, Prefix="out/")
        keys = [o["Key"] for p in pages for o in p.get("Contents", [])]
        assert "out/sec/_manifest.json" in keys
        for k in (k for k in keys if not k.endswith("/")):  # not pyarrow's directory markers
            (out_dir / k).parent.mkdir(parents=True, exist_ok=True)
            client.download_file(s3_bucket, k, str(out_dir / k))
    files = [p for p in out_dir.rglob("*") if p.is_file()]
    assert any(p.name == "_manifest.json" for p in files) and any(p.suffix == ".parquet" for p in files)
    assert scan_tree(out_dir) == {}
    logs = list(ray_tmp.glob("*/session_2*/logs"))  # RAY_TMPDIR/ray/session_<time>/logs
    assert logs and any(p.is_file() for p in logs[0].rglob("*")), "the subprocess wrote no Ray logs to scan"
    for d in logs:
        assert scan_tree(d) == {}
    import ray

    if ray.is_initialized():  # this process's Ray (other tests' in-process runs) too
        from ray._private import worker

        assert scan_tree(Path(worker._global_node.get_session_dir_path()) / "logs") == {}
