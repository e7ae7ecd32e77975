"""`nrm-ood score` on a real two-node Ray cluster on this machine, token auth on, inputs and outputs on S3.

The head node (1 CPU) and a second node (2 CPUs and a custom resource ``second``) are two raylets
started with `ray start`, each in its own session and temp dir; the scoring actors ask for ``second``,
so they can only run on the second node. moto's S3 server holds the inputs and outputs. Torn down by
killing exactly the processes these nodes started (helpers shared with test_ray_job_submit.py).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from support import make_checkpoint, outputs_of, png_bytes, random_images, write_hf_parquet
from test_ray_job_submit import BIN, kill_all, ports, started_by

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.s3]

if not (BIN / "ray").is_file():
    pytest.skip(f"the `ray` CLI is not installed beside {BIN / 'python'}: cannot start a two-node cluster",
                allow_module_level=True)


def node_args(temp_dir: str, six_ports: list[int]) -> list[str]:
    nm, om, agent, agent_grpc, metrics, rt_env = six_ports
    return ["--block", "--node-ip-address", "127.0.0.1", "--num-gpus", "0", "--temp-dir", temp_dir,
            "--node-manager-port", str(nm), "--object-manager-port", str(om), "--dashboard-agent-listen-port",
            str(agent), "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
            "--runtime-env-agent-port", str(rt_env), "--object-store-memory", str(100 * 1024 * 1024),
            "--disable-usage-stats"]


@contextmanager
def two_nodes(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """(GCS address, environment for drivers) of a head node plus a second node offering resource 'second'."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    temp_dir = tempfile.mkdtemp(prefix="nrm2n-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    gcs, *more = ports(13)  # drawn together: ports drawn apart can repeat, and Ray refuses a port given twice
    head = [str(BIN / "ray"), "start", "--head", "--port", str(gcs), "--num-cpus", "1", "--include-dashboard",
            "false", *node_args(temp_dir, more[:6])]
    second = [str(BIN / "ray"), "start", "--address", f"127.0.0.1:{gcs}", "--num-cpus", "2",
              "--resources", '{"second": 1}', *node_args(temp_dir, more[6:])]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name, cmd in (("head", head), ("second", second)):
            with open(tmp_path / f"ray-{name}.log", "wb") as log:
                procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
            wait_for(gcs, env, procs, tmp_path, nodes=len(procs))
        yield f"127.0.0.1:{gcs}", env
    finally:
        for p in reversed(procs):
            with suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        kill_all([pid for p in procs for pid in started_by(p.pid, temp_dir)], grace=5)
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_for(gcs: int, env: dict[str, str], procs: list[subprocess.Popen[bytes]], tmp_path: Path, nodes: int) -> None:
    """Until `ray status` shows ``nodes`` alive nodes (150 s at most)."""
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            logs = "".join(f.read_text()[-1500:] for f in tmp_path.glob("ray-*.log"))
            raise RuntimeError(f"a `ray start` exited early:\n{logs}")
        with suppress(subprocess.TimeoutExpired):
            r = subprocess.run([str(BIN / "ray"), "status", "--address", f"127.0.0.1:{gcs}"], env=env,
                               capture_output=True, text=True, timeout=60)
            if r.returncode == 0 and r.stdout.count(" node_") >= nodes:
                return
        time.sleep(1)
    raise RuntimeError(f"the cluster did not reach {nodes} node(s) in 150 s")


@pytest.mark.timeout(600)
def test_two_node_cluster_scores_s3_inputs_on_the_second_node(moto_server: str, s3_bucket: str,
                                                              tmp_path: Path) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=moto_server)
    ckpt = make_checkpoint(tmp_path / "ckpt")
    ids = []
    for i in range(4):
        imgs: list[bytes | None] = [png_bytes(p) for p in random_images(30, seed=80 + i)]
        write_hf_parquet(tmp_path / f"s{i}.parquet", imgs, row_group_size=10)
        client.upload_file(str(tmp_path / f"s{i}.parquet"), s3_bucket, f"in/s{i}.parquet")
        ids += [f"s3://{s3_bucket}/in/s{i}.parquet#{j}" for j in range(30)]
    with two_nodes(tmp_path) as (address, env):
        r = subprocess.run([str(BIN / "nrm-ood"), "score", "--model", str(ckpt), "--input", f"s3://{s3_bucket}/in",
                            "--output", f"s3://{s3_bucket}/out", "--run-id", "two", "--batch-size", "16",
                            "--rows-per-file", "50", "--actors", "1", "--cpus-per-actor", "1",
                            "--actor-resource", "second=1", "--address", address],
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "run two: complete" in r.stdout
    m = json.loads(client.get_object(Bucket=s3_bucket, Key="out/two/_manifest.json")["Body"].read())
    assert m["rows"] == {"in": 120, "ok": 120, "error": 0}
    assert m["options"]["actor_resources"] == {"second": 1.0}  # actors could only be placed on the second node
    fs = pafs.S3FileSystem(endpoint_override=moto_server.split("://", 1)[1], scheme="http", region="us-east-1")
    listed = outputs_of(m)
    t = pa.concat_tables([pq.read_table(o["uri"][len("s3://"):], filesystem=fs) for o in listed])
    assert t.num_rows == 120 and len(set(t["id"].to_pylist())) == 120  # rows in == rows out, no duplicate id
    assert sorted(t["id"].to_pylist()) == sorted(ids)
