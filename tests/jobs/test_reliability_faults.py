"""Faults: a scoring actor dies, the driver dies, S3 fails requests, two runs race to commit one run id.

Each test ends by reading the committed output back: rows in == ok + error, no duplicate id, no row
missing, and (where the same input was scored uninterrupted) the same ids and scores.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from faultproxy import FaultProxy
from support import make_checkpoint, outputs_of, png_bytes, random_images, write_hf_parquet

from jobs.pipeline import KILL_ACTOR_ENV, RunResult, ScoreOptions, run_score, summary
from jobs.storage import Store

SCORES = ["pred", "max_softmax", "latent_prior", "latent_loglik", "recon_sq_error", "loglik_bound", "ood_score"]
EXE = str(Path(sys.executable).with_name("nrm-ood"))


def read_committed(m: dict[str, Any], fs: pafs.FileSystem | None = None) -> pa.Table:
    """The rows a committed manifest lists, sorted by id, after checking the accounting and uniqueness."""
    def path(uri: str) -> str:
        return uri[len("s3://"):] if uri.startswith("s3://") else uri

    t = pa.concat_tables([pq.read_table(path(o["uri"]), filesystem=fs) for o in outputs_of(m)])
    assert t.num_rows == m["rows"]["in"] == m["rows"]["ok"] + m["rows"]["error"], m["rows"]
    assert len(set(t["id"].to_pylist())) == t.num_rows, "duplicate ids in the committed output"
    return t.sort_by("id")


def assert_same_scores(a: pa.Table, b: pa.Table) -> None:
    assert a["id"].to_pylist() == b["id"].to_pylist()
    assert a["status"].to_pylist() == b["status"].to_pylist()
    for c in SCORES:
        np.testing.assert_allclose(a[c].to_numpy(zero_copy_only=False).astype(float),
                                   b[c].to_numpy(zero_copy_only=False).astype(float), rtol=1e-6, atol=1e-6, err_msg=c)


def manifest_of(out: Path, run_id: str) -> dict[str, Any]:
    return json.loads((out / run_id / "_manifest.json").read_text())


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, **extra}


def score_cmd(data: dict[str, Any], out: Path, run_id: str) -> list[str]:
    return [EXE, "score", "--model", str(data["ckpt"]), "--input", str(data["in"]), "--output", str(out),
            "--run-id", run_id, "--batch-size", "40", "--rows-per-file", "400"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> dict[str, Any]:
    """Two shards (2,400 rows in 60 row groups, two corrupt rows) and their uninterrupted in-process run."""
    root = tmp_path_factory.mktemp("rel-faults")
    ckpt = make_checkpoint(root / "ckpt")
    (root / "in").mkdir()
    for i in range(2):
        imgs: list[bytes | None] = [png_bytes(p) for p in random_images(1200, seed=30 + i)]
        imgs[17 + i] = b"corrupt"
        write_hf_parquet(root / "in" / f"part-{i}.parquet", imgs, labels=[i] * 1200, row_group_size=40)
    r = run_score(ScoreOptions(str(ckpt), str(root / "in"), str(root / "ref"), run_id="ref", batch_size=40),
                  echo=lambda _m: None)
    assert r.status == "complete"
    ref = read_committed(r.manifest)
    assert (ref.num_rows, r.manifest["rows"]["error"]) == (2400, 2)
    return {"root": root, "ckpt": ckpt, "in": root / "in", "ref": ref}


# ---------------------------------------------------------------------------- a scoring actor dies
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_killed_scoring_actor_is_restarted_and_its_batches_redone(data: dict[str, Any], tmp_path: Path) -> None:
    marker = tmp_path / "kill-at"
    marker.write_text("3")  # the actor dies (os._exit) on its 3rd batch, once
    out = tmp_path / "out"
    r = subprocess.run(score_cmd(data, out, "ak"), env=cli_env(**{KILL_ACTOR_ENV: str(marker)}), cwd=tmp_path,
                       capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not marker.exists(), "the fault was never injected"
    m = manifest_of(out, "ak")
    assert m["status"] == "complete" and m["rows"] == {"in": 2400, "ok": 2398, "error": 2}
    assert_same_scores(read_committed(m), data["ref"])


# ---------------------------------------------------------------------------- the driver dies
def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the driver (the fault), then whatever it had started (embedded Ray), by pid."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    time.sleep(1)  # let fate-sharing take Ray's processes down on its own first
    for c in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            c.kill()
    psutil.wait_procs(children, timeout=30)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_killed_driver_then_rerun_resumes_and_commits_the_same_output_once(data: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = score_cmd(data, out, "dk")
    proc = subprocess.Popen(cmd, env=cli_env(), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if any((out / "dk").glob("attempt-*/*.parquet")):
                break
            time.sleep(0.02)
    finally:
        _kill_tree(proc)
    assert proc.returncode == -signal.SIGKILL, "the driver finished before it could be killed"
    assert not (out / "dk" / "_manifest.json").exists(), "killed too late: the run had committed"
    stale = sorted(p.name for p in (out / "dk").glob("attempt-*"))
    assert len(stale) == 1 and any((out / "dk" / stale[0]).glob("*.parquet"))

    r = subprocess.run(cmd, env=cli_env(), cwd=tmp_path, capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = manifest_of(out, "dk")
    assert m["status"] == "complete" and m["rows"] == {"in": 2400, "ok": 2398, "error": 2}
    # the rerun (same command, same run id) resumed: parts of the killed attempt it kept are listed, and they
    # are exactly the rows it did not score again
    kept = [o for o in outputs_of(m) if f"/{stale[0]}/" in o["uri"]]
    assert sum(o["rows"] for o in kept) == m["resumed_rows"]
    assert all(Path(o["uri"]).is_file() for o in outputs_of(m))
    assert_same_scores(read_committed(m), data["ref"])


# ---------------------------------------------------------------------------- S3 fails requests
@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.timeout(300)
def test_s3_faults_are_retried_and_the_run_commits_exactly_once(moto_server: str, s3_bucket: str, tmp_path: Path,
                                                                ray_local: None) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=moto_server)
    ckpt = make_checkpoint(tmp_path / "ckpt")
    for f in ("config.json", "weights.safetensors"):
        client.upload_file(str(ckpt / f), s3_bucket, f"m/{f}")
    for i in range(3):
        write_hf_parquet(tmp_path / f"s{i}.parquet", [png_bytes(p) for p in random_images(20, seed=50 + i)],
                         row_group_size=5)
        client.upload_file(str(tmp_path / f"s{i}.parquet"), s3_bucket, f"data/s{i}.parquet")
    b = f"s3://{s3_bucket}"
    with FaultProxy(moto_server, every=7, max_faults=24) as proxy:
        r = run_score(ScoreOptions(f"{b}/m", f"{b}/data", f"{b}/out", run_id="flaky", batch_size=8,
                                   endpoint_url=proxy.url), echo=lambda _m: None)
    counts = dict(proxy.counts)
    print(f"faultproxy counts: {counts}")  # shown with -s; docs/reliability.md quotes it
    assert (r.status, r.exit_code) == ("complete", 0), counts
    assert all(counts.get(k, 0) >= 1 for k in ("500", "503", "drop")), counts
    assert counts["lost_response"] == 1, counts  # the manifest's put landed, its answer was lost, the retry saw it
    assert proxy.faults >= 4 and counts["requests"] > proxy.faults

    m = json.loads(client.get_object(Bucket=s3_bucket, Key="out/flaky/_manifest.json")["Body"].read())
    assert m["rows"] == {"in": 60, "ok": 60, "error": 0}
    host = moto_server.split("://", 1)[1]
    t = read_committed(m, pafs.S3FileSystem(endpoint_override=host, scheme="http", region="us-east-1"))
    assert t["id"].to_pylist() == sorted(f"{b}/data/s{i}.parquet#{j}" for i in range(3) for j in range(20))
    local = run_score(ScoreOptions(str(ckpt), str(tmp_path / "s0.parquet"), str(tmp_path / "out"), run_id="l",
                                   batch_size=8), echo=lambda _m: None)
    s0 = t.filter(pa.compute.starts_with(t["id"], f"{b}/data/s0.parquet#"))
    lt = read_committed(local.manifest)
    np.testing.assert_allclose(s0["latent_loglik"].to_numpy(), lt["latent_loglik"].to_numpy(), rtol=1e-6)


# ---------------------------------------------------------------------------- two runs race to commit
@pytest.mark.ray
@pytest.mark.timeout(300)
@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_runs_racing_for_one_run_id_commit_exactly_once(where: str, tmp_path: Path, moto_server: str,
                                                            s3_bucket: str, ray_local: None) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt")
    write_hf_parquet(tmp_path / "a.parquet", [png_bytes(p) for p in random_images(24, seed=60)], row_group_size=6)
    out = str(tmp_path / "out") if where == "local" else f"s3://{s3_bucket}/out"
    barrier = threading.Barrier(2, timeout=120)  # both are past the "already committed?" check before either scores
    results: dict[int, RunResult | BaseException] = {}

    def go(i: int) -> None:
        try:
            results[i] = run_score(ScoreOptions(str(ckpt), str(tmp_path / "a.parquet"), out, run_id="race",
                                                batch_size=8, actors=1, cpus_per_actor=0.5),
                                   echo=lambda _m: barrier.wait())
        except BaseException as e:
            results[i] = e

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(280)
    assert all(isinstance(r, RunResult) for r in results.values()) and len(results) == 2, results
    runs: list[RunResult] = sorted(results.values(), key=lambda r: r.status)  # type: ignore[arg-type]
    winner, loser = runs
    assert (winner.status, winner.exit_code, loser.status, loser.exit_code) == ("complete", 0, "lost-commit-race", 4)
    assert "another run committed run id race first" in summary(loser)

    store = Store()
    fs, root = store.filesystem(f"{out}/race")
    files = {i.path[len(root) + 1:] for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
             if i.type == pafs.FileType.File}
    win_attempt = winner.manifest["outputs"]["uri"].split("/race/", 1)[1].split("/")[0]
    lose_attempt = loser.manifest["outputs"]["uri"].split("/race/", 1)[1].split("/")[0]  # deleted with its list
    assert win_attempt != lose_attempt
    lists = [winner.manifest[k]["uri"] for k in ("inputs", "outputs", "covered")]  # beside the winner's outputs
    assert files == {"_manifest.json", "_delta_log/00000000000000000000.json"} | {u.split("/race/", 1)[1] for u in
                                          [o["uri"] for o in outputs_of(winner.manifest)] + lists}, files
    committed = store.read_json(f"{out}/race/_manifest.json")
    assert outputs_of(committed) == outputs_of(winner.manifest)
    t = read_committed(committed, fs if where == "s3" else None)
    assert t.num_rows == 24
