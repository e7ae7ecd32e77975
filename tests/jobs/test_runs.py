"""Committed runs as tables: exact rows in DuckDB, Polars and pandas (resumed runs, leftover attempts),
the Delta log, the removal of unused attempts, and `nrm-ood runs` / `nrm-ood audit`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from support import make_checkpoint, outputs_of, png_bytes, random_images, write_hf_parquet
from typer.testing import CliRunner

from jobs import manifest, parts, runs, table
from jobs.cli import app
from jobs.pipeline import Interrupted, RunResult, ScoreOptions, run_score
from jobs.storage import Store

runner = CliRunner(env={"COLUMNS": "200"})


def score(model: Path | str, input: Path | str, output: Path | str, run_id: str, **kw: Any) -> RunResult:
    return run_score(ScoreOptions(str(model), str(input), str(output), run_id=run_id,
                                  **{"batch_size": 10, "rows_per_file": 10, **kw}), echo=lambda _msg: None)


def duckdb_count(run: Path) -> int:
    """SELECT count(*) FROM delta_scan(run), with DuckDB's delta extension from its PyPI package."""
    import duckdb
    import duckdb_extension_delta

    ext = Path(duckdb_extension_delta.__file__).parent / "extensions" / f"v{duckdb.__version__}" / "delta.duckdb_extension"
    con = duckdb.connect()
    con.sql(f"LOAD '{ext}'")
    return int(con.sql(f"SELECT count(*) FROM delta_scan('{run}')").fetchone()[0])  # type: ignore[index]


def polars_count(run: Path) -> int:
    import polars as pl

    return pl.read_delta(str(run)).height


def pandas_count(run: Path) -> int:
    from deltalake import DeltaTable

    return len(DeltaTable(str(run)).to_pandas())


def glob_count(run: Path) -> int:
    """What the issue's DuckDB glob counts: every Parquet file below the run (side lists included)."""
    return sum(pq.ParquetFile(p).metadata.num_rows for p in run.rglob("*.parquet"))


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run r over a, b, c (30 rows each, 10-row parts): the first driver dies before its commit, c's part
    files are then lost, and --resume keeps a and b's parts and scores c again."""
    from jobs import pipeline

    root = tmp_path_factory.mktemp("resumed")
    ckpt = make_checkpoint(root / "ckpt")
    inp, out = root / "in", root / "out"
    inp.mkdir()
    for i, name in enumerate("abc"):
        write_hf_parquet(inp / f"{name}.parquet", [png_bytes(p) for p in random_images(30, seed=70 + i)],
                         row_group_size=10)

    def driver_dies(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline.Run, "commit", driver_dies)
        with pytest.raises(Interrupted):
            score(ckpt, inp, out, "r")
    (first,) = parts.attempts(Store(), str(out / "r"))
    _, written = parts.scan_attempt(Store(), first)
    for p in written:
        if str(inp / "c.parquet") in p["sources"]:
            os.unlink(p["uri"])
    result = score(ckpt, inp, out, "r", resume="r")
    return {"root": root, "ckpt": ckpt, "in": inp, "out": out, "run": out / "r", "first": first, "result": result}


pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_local")]


def test_a_resumed_run_reads_exactly_its_rows_in_duckdb_polars_and_pandas(resumed: dict[str, Any]) -> None:
    m = resumed["result"].manifest
    assert (m["rows"]["in"], m["resumed_rows"]) == (90, 60)
    assert duckdb_count(resumed["run"]) == polars_count(resumed["run"]) == pandas_count(resumed["run"]) == 90


def test_a_leftover_attempt_is_read_by_a_glob_but_not_by_duckdb_or_polars(resumed: dict[str, Any],
                                                                        tmp_path: Path) -> None:
    run = tmp_path / "r"
    shutil.copytree(resumed["run"], run)
    leftover = run / "attempt-29991231T000000000000Z-dead00"  # a racing driver's parts, written after the commit
    leftover.mkdir()
    for p in sorted((run / Path(resumed["first"]).name).glob("part-*.parquet"))[:2]:
        shutil.copy(p, leftover / p.name)
    # the copy's log names the original run's parts by relative path: they resolve inside the copy
    assert glob_count(run) > 90
    assert duckdb_count(run) == polars_count(run) == pandas_count(run) == 90


def test_the_commit_removes_the_files_the_run_does_not_use(resumed: dict[str, Any]) -> None:
    m = resumed["result"].manifest
    run = resumed["run"]
    used = {str(Path(o["uri"]).relative_to(run)) for o in outputs_of(m)}
    lists = {str(Path(m[k]["uri"]).relative_to(run)) for k in ("inputs", "outputs", "covered")}
    assert tree(run) == {"_manifest.json", "_delta_log/00000000000000000000.json", *used, *lists}
    assert any(u.startswith(Path(resumed["first"]).name + "/") for u in used)  # the first attempt's parts stay


def test_the_delta_log_adds_each_committed_part_once_with_its_rows(resumed: dict[str, Any]) -> None:
    run = resumed["run"]
    log = [json.loads(line) for line in (run / "_delta_log" / table.VERSION_0).read_text().splitlines()]
    adds = [a["add"] for a in log if "add" in a]
    outs = outputs_of(resumed["result"].manifest)
    assert sorted(a["path"] for a in adds) == sorted(str(Path(o["uri"]).relative_to(run)) for o in outs)
    assert sum(json.loads(a["stats"])["numRecords"] for a in adds) == 90
    assert all(a["size"] == (run / a["path"]).stat().st_size for a in adds)


def test_prune_removes_leftovers_of_committed_runs_and_leaves_uncommitted_runs(resumed: dict[str, Any]) -> None:
    out = resumed["out"]
    before = tree(out / "r")
    leftover = out / "r" / "attempt-29991231T000000000000Z-dead00" / "part-x.parquet"
    leftover.parent.mkdir()
    leftover.write_bytes(b"PAR1")
    pending = out / "pending" / "attempt-1" / "part-y.parquet"  # an uncommitted run: kept for --resume
    pending.parent.mkdir(parents=True)
    pending.write_bytes(b"PAR1")
    r = runner.invoke(app, ["runs", str(out), "--prune"])
    assert r.exit_code == 0, r.output
    assert r.output == "r: removed 1 unused file(s)\n"
    assert tree(out / "r") == before and not leftover.parent.exists() and pending.exists()
    shutil.rmtree(out / "pending")


def test_prune_writes_the_delta_log_a_dead_driver_did_not(resumed: dict[str, Any]) -> None:
    log = resumed["run"] / "_delta_log" / table.VERSION_0
    expected = log.read_text()
    log.unlink()
    assert runs.prune(Store(), str(resumed["out"])) == {"r": ([], True)}
    assert log.read_text() == expected and polars_count(resumed["run"]) == 90


def test_prune_of_a_copied_output_removes_nothing_and_says_why(resumed: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(resumed["out"], out)
    before = tree(out)
    r = runner.invoke(app, ["runs", str(out), "--prune"])
    assert r.exit_code == 1 and "outside " + str(out / "r") in r.stderr and "nothing of it was removed" in r.stderr
    assert tree(out) == before


def test_runs_files_prints_the_committed_part_uris(resumed: dict[str, Any]) -> None:
    r = runner.invoke(app, ["runs", str(resumed["out"]), "--files", "r"])
    assert r.exit_code == 0, r.output
    assert r.output.split() == [o["uri"] for o in outputs_of(resumed["result"].manifest)]


def test_runs_files_of_a_run_that_is_not_committed_fails_naming_it(resumed: dict[str, Any]) -> None:
    r = runner.invoke(app, ["runs", str(resumed["out"]), "--files", "nope"])
    assert r.exit_code == 1 and "no committed run 'nope'" in r.stderr


def test_the_manifest_records_drift_against_the_checkpoints_reference(resumed: dict[str, Any]) -> None:
    d = resumed["result"].manifest["drift"]
    assert (d["ok"], d["errors"], d["score"]) == (90, 0, "latent_loglik")
    assert d["expected"] == pytest.approx(0.05, abs=0.02) and d["reference_rows"] == 64
    assert d["ks"] is not None and 0 <= d["ks"] <= 1 and f": {d['verdict']}" in d["line"]
    assert "threshold" in resumed["result"].manifest and "reference" not in resumed["result"].manifest["threshold"]


def test_a_committed_run_on_s3_is_a_delta_table_with_exactly_its_rows(resumed: dict[str, Any], moto_server: str,
                                                                       s3_bucket: str) -> None:
    from deltalake import DeltaTable

    out = f"s3://{s3_bucket}/scores"
    r = score(resumed["ckpt"], resumed["in"], out, "s3run")
    assert r.status == "complete"
    options = {"AWS_ENDPOINT_URL": moto_server, "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1",
               "AWS_ACCESS_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"],
               "AWS_SECRET_ACCESS_KEY": os.environ["AWS_SECRET_ACCESS_KEY"]}
    assert len(DeltaTable(f"{out}/s3run", storage_options=options).to_pandas()) == 90
    assert table.commit_table(Store(), out, "s3run", r.manifest) is False  # create-if-absent: written once


# ---------------------------------------------------------------------------- runs over time and the audit
def commit_night(out: Path, run_id: str, created: str, ok: int, errors: int, flagged: int, ks: float,
                 ks_p: float) -> None:
    from jobs.drift import Drift, Limits, flagged_p

    d = Drift("det_x", ok, errors, flagged, 0.05, 5000, flagged_p(flagged, ok, 0.05), ks, ks_p)
    manifest.commit(Store(), str(out), run_id, {"status": "complete", "created": created,
                                                "rows": {"in": ok + errors, "ok": ok, "error": errors},
                                                "flagged_ood": flagged, "drift": d.to_json(Limits())})


@pytest.fixture
def nights(tmp_path: Path) -> Path:
    out = tmp_path / "audit"
    commit_night(out, "n2", "2026-12-02T03:00:00+00:00", 2400, 0, 692, 0.21, 1e-90)
    commit_night(out, "n1", "2026-12-01T03:00:00+00:00", 3000, 4, 170, 0.02, 0.2)
    return out


def test_runs_lists_nights_in_time_order_with_flagged_expected_ks_and_verdict(nights: Path) -> None:
    r = runner.invoke(app, ["runs", str(nights)])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split() == ["created", "run", "id", "rows", "errors", "flagged", "expected", "KS", "verdict"]
    assert lines[1].split() == ["2026-12-01T03:00:00+00:00", "n1", "3004", "4", "5.7%", "5.0%", "0.020", "no", "drift"]
    assert lines[2].split() == ["2026-12-02T03:00:00+00:00", "n2", "2400", "0", "28.8%", "5.0%", "0.210", "drift"]


def test_runs_json_gives_the_same_for_machines(nights: Path) -> None:
    r = runner.invoke(app, ["runs", str(nights), "--json"])
    rows = json.loads(r.output)
    assert [(x["run_id"], x["verdict"], x["flagged"], x["ks"]) for x in rows] == [("n1", "no drift", 170, 0.02),
                                                                                ("n2", "drift", 692, 0.21)]


def test_audit_exits_5_when_the_latest_night_drifted(nights: Path) -> None:
    r = runner.invoke(app, ["audit", str(nights)])
    assert r.exit_code == 5
    assert r.output.startswith("n2 (2026-12-02T03:00:00+00:00): flagged 28.8% of 2400 ok rows (expected 5.0%")


def test_audit_exits_0_within_the_users_limits(nights: Path) -> None:
    r = runner.invoke(app, ["audit", str(nights), "--max-flagged", "0.3", "--max-drift", "0.25"])
    assert r.exit_code == 0, r.output
    assert r.output.rstrip().endswith(": shift")


def test_audit_of_a_named_clean_night_exits_0(nights: Path) -> None:
    assert runner.invoke(app, ["audit", str(nights), "--run-id", "n1"]).exit_code == 0


def test_audit_refuses_a_limit_outside_0_1(nights: Path) -> None:
    r = runner.invoke(app, ["audit", str(nights), "--max-drift", "2"])
    assert r.exit_code == 2 and "must be a fraction in [0, 1], got 2" in r.stderr


def test_audit_of_an_output_without_runs_fails_in_one_sentence(tmp_path: Path) -> None:
    r = runner.invoke(app, ["audit", str(tmp_path)])
    assert r.exit_code == 1 and r.stderr.startswith(f"error: no committed run under '{tmp_path}'")


def test_prune_on_s3_removes_a_leftover_object_and_keeps_the_committed_parts(resumed: dict[str, Any],
                                                                              moto_server: str, s3_bucket: str) -> None:
    import boto3

    out = f"s3://{s3_bucket}/scores"
    assert score(resumed["ckpt"], resumed["in"], out, "s3run").status == "complete"
    key = "scores/s3run/attempt-29991231T000000000000Z-dead00/part-x.parquet"
    s3 = boto3.client("s3", endpoint_url=moto_server)
    s3.put_object(Bucket=s3_bucket, Key=key, Body=b"PAR1")
    assert runs.prune(Store(), out) == {"s3run": ([f"s3://{s3_bucket}/{key}"], False)}
    left = {f"s3://{s3_bucket}/{o['Key']}" for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="scores/s3run/")["Contents"]}
    assert set(runs.files(Store(), out, "s3run")) < left and not any("dead00" in u for u in left)
