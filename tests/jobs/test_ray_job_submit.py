"""`ray job submit` of `nrm-ood score` to a real head node with token authentication on.

The head node runs in its own session, temp dir and ports, so it never meets the session's embedded
runtime or anyone else's cluster; it is torn down by killing exactly the processes it started
(`ray stop` would stop every Ray process on the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import free_port, make_checkpoint, outputs_of, png_bytes, random_images, write_hf_parquet

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BIN = Path(sys.executable).parent


def dashboard_dependency_error() -> str | None:
    try:
        from ray._private.utils import get_dashboard_dependency_error

        return get_dashboard_dependency_error()  # type: ignore[no-any-return]
    except ImportError as e:  # a Ray without that helper: try the dashboard's own first import
        try:
            import aiohttp  # noqa: F401
        except ImportError:
            return str(e)
        return None


DASHBOARD_MISSING = dashboard_dependency_error()


class HeadStartFailed(RuntimeError):
    pass


@dataclass
class Head:
    gcs: str
    dashboard: str | None
    env: dict[str, str]
    temp_dir: str


def ports(n: int) -> list[int]:
    out: list[int] = []
    while len(out) < n:
        p = free_port()
        if p not in out:
            out.append(p)
    return out


def http_status(url: str, token: str | None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def started_by(leader: int, temp_dir: str) -> list[int]:
    """Pids of the head node we started: its session (ray start led it), or naming its temp dir."""
    mine = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if os.getsid(pid) == leader or temp_dir in cmdline:
                mine.append(pid)
        except (OSError, ProcessLookupError):
            continue
    return mine


def kill_all(pids: list[int], grace: float) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.2)


@contextmanager
def head_node(tmp_path: Path, dashboard: bool) -> Iterator[Head]:
    """A 2-CPU head node with token auth, in its own session, temp dir and ports."""
    temp_dir = tempfile.mkdtemp(prefix="nrmray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    gcs, dash, agent, agent_grpc, metrics, rt_env, nm, om = ports(8)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    log = tmp_path / "ray-start.log"
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--num-gpus", "0",
           "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--include-dashboard", str(dashboard).lower(),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
           "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(rt_env),
           "--node-manager-port", str(nm), "--object-manager-port", str(om),
           "--object-store-memory", str(100 * 1024 * 1024), "--temp-dir", temp_dir, "--disable-usage-stats"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    h = Head(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}" if dashboard else None, env, temp_dir)
    try:
        deadline = time.monotonic() + 150
        while True:
            if proc.poll() is not None:
                raise HeadStartFailed(f"ray start exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
            try:
                if h.dashboard:
                    up = http_status(f"{h.dashboard}/api/version", env["RAY_AUTH_TOKEN"]) == 200
                else:
                    up = ray_cli(h, "status", "--address", h.gcs, timeout=60).returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                up = False
            if up:
                break
            if time.monotonic() > deadline:
                raise HeadStartFailed(f"the head node did not come up in 150 s:\n{log.read_text()[-2000:]}")
            time.sleep(1)
        yield h
    finally:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        kill_all(started_by(proc.pid, temp_dir), grace=5)
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        shutil.rmtree(temp_dir, ignore_errors=True)


def ray_cli(head: Head, *args: str, timeout: float, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(head.env)
    if token is not None:
        env["RAY_AUTH_TOKEN"] = token
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout)


def stage(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A checkpoint and one 9-row HF shard (row 3 corrupt); returns (checkpoint, input dir, output dir)."""
    ckpt = make_checkpoint(tmp_path / "ckpt")
    imgs: list[bytes | None] = [png_bytes(p) for p in random_images(9, seed=31)]
    imgs[3] = b"corrupt"
    (tmp_path / "in").mkdir()
    write_hf_parquet(tmp_path / "in" / "a.parquet", imgs, labels=[0] * 9, row_group_size=4)
    return ckpt, tmp_path / "in", tmp_path / "out"


def check_manifest(out: Path, run_id: str) -> None:
    m = json.loads((out / run_id / "_manifest.json").read_text())
    assert m["status"] == "complete" and m["run_id"] == run_id
    assert m["rows"] == {"in": 9, "ok": 8, "error": 1}
    assert m["rows"]["in"] == m["rows"]["ok"] + m["rows"]["error"]
    assert sum(o["rows"] for o in outputs_of(m)) == 9
    assert all(Path(o["uri"]).is_file() for o in outputs_of(m))


@pytest.mark.timeout(420)
def test_ray_job_submit_scores_and_commits(tmp_path: Path) -> None:
    ckpt, inp, out = stage(tmp_path)
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "README.txt").write_text("working dir of the submitted job\n")
    with head_node(tmp_path, dashboard=True) as head:
        assert head.dashboard
        # Token auth is really on: the Jobs API refuses no token and a wrong one.
        assert http_status(f"{head.dashboard}/api/version", None) == 401
        assert http_status(f"{head.dashboard}/api/version", "0" * 64) in (401, 403)
        wrong = ray_cli(head, "job", "list", "--address", head.dashboard, timeout=60, token=secrets.token_hex(32))
        assert wrong.returncode != 0, wrong.stdout + wrong.stderr

        sub_id = f"nrm-test-{secrets.token_hex(4)}"
        r = ray_cli(head, "job", "submit", "--address", head.dashboard, "--submission-id", sub_id,
                    "--working-dir", str(wd), "--", "nrm-ood", "score", "--model", str(ckpt), "--input", str(inp),
                    "--output", str(out), "--run-id", "submitted", "--batch-size", "4", timeout=330)
        logs = r.stdout[-4000:] + r.stderr[-4000:]
        assert r.returncode == 0, logs
        assert "run submitted: complete" in r.stdout, logs
        status = ray_cli(head, "job", "status", "--address", head.dashboard, sub_id, timeout=60)
        assert "succeeded" in (status.stdout + status.stderr).lower()
    check_manifest(out, "submitted")


@pytest.mark.timeout(420)
def test_driver_joins_a_token_auth_cluster(tmp_path: Path) -> None:
    """What works without the Jobs API: `nrm-ood score --address` as a driver of a token-auth cluster."""
    ckpt, inp, out = stage(tmp_path)
    with head_node(tmp_path, dashboard=False) as head:
        wrong = ray_cli(head, "status", "--address", head.gcs, timeout=60, token=secrets.token_hex(32))
        assert wrong.returncode != 0 and "InvalidAuthToken" in wrong.stdout + wrong.stderr
        r = subprocess.run([str(BIN / "nrm-ood"), "score", "--model", str(ckpt), "--input", str(inp),
                            "--output", str(out), "--run-id", "driver", "--batch-size", "4", "--address", head.gcs],
                           env=head.env, cwd=tmp_path, capture_output=True, text=True, timeout=330)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "run driver: complete" in r.stdout
    check_manifest(out, "driver")
