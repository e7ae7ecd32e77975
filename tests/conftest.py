"""Shared fixtures: one Ray runtime, one moto S3 server, tiny checkpoints. Helpers live in support.py.

Everything is local: Ray runs embedded with 2 CPUs; S3 is moto's real HTTP server on 127.0.0.1,
and both boto3 and pyarrow talk to it through AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import FAKE_KEY_ID, FAKE_SECRET, free_port, make_checkpoint


@pytest.fixture
def tiny_ckpt(tmp_path: Path) -> Path:
    return make_checkpoint(tmp_path / "ckpt")


@pytest.fixture(scope="session")
def ray_local(moto_server: str) -> Iterator[None]:
    """One embedded Ray runtime (2 CPUs) for the whole session. It depends on moto_server because Ray
    workers take their environment when Ray starts: they must already see the S3 endpoint."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (real HTTP); sets the AWS environment for boto3 and pyarrow."""
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            __import__('socket').create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("moto_server did not start")
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": FAKE_KEY_ID, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
           "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield url
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def s3_bucket(moto_server: str, request: pytest.FixtureRequest) -> str:
    """A fresh bucket; returns its name."""
    import boto3

    name = "t-" + "".join(ch if ch.isalnum() else "-" for ch in request.node.name.lower())[:40].strip("-") + \
        f"-{os.getpid() % 1000}-{time.monotonic_ns() % 100000}"
    boto3.client("s3", endpoint_url=moto_server).create_bucket(Bucket=name)
    return name
