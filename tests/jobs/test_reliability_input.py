"""Bad input: every kind of broken row, file and run, and where each one ends up.

Row-level problems are ``status="error"`` rows naming what was expected; file-level problems are the
manifest's ``failed_inputs`` and exit code 3; whole-run problems stop before any work with one sentence
on stderr, exit 1 and nothing under the output. One strict-policy run over a directory of bad files
covers the first two kinds; the CLI cases cover the third.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from support import (
    FAKE_KEY_ID,
    FAKE_SECRET,
    free_port,
    inputs_of,
    make_checkpoint,
    outputs_of,
    png_bytes,
    random_images,
    write_hf_parquet,
)
from typer.testing import CliRunner

from jobs.cli import app
from jobs.images import Policy
from jobs.pipeline import RunResult, ScoreOptions, run_score

HF = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
runner = CliRunner(env={"COLUMNS": "200"})


def bomb_png(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header announces width x height pixels (a decompression bomb, cheaply)."""
    buf = io.BytesIO()
    Image.new("1", (8, 8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def read_rows(m: dict[str, Any]) -> list[dict[str, Any]]:
    t = pa.concat_tables([pq.read_table(o["uri"]) for o in outputs_of(m)])
    return t.sort_by([("source_path", "ascending"), ("source_row", "ascending")]).to_pylist()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("rel-in-ckpt") / "m")


# ---------------------------------------------------------------------------- one run over many bad files
# (file, row) -> what its error must say; every other row of the run must be ok
ROW_ERRORS = {
    ("a_hf.parquet", 2): "cannot decode image (",
    ("a_hf.parquet", 3): "empty image (no bytes)",
    ("a_hf.parquet", 4): "empty image (no bytes)",  # null cell
    ("a_hf.parquet", 5): "decompression bomb refused",
    ("a_hf.parquet", 6): "with 3 channel(s) (RGB); the model expects 8x8 with 1 (policy strict)",
    ("a_hf.parquet", 7): "image is 16x16 with 1 channel(s) (L); the model expects 8x8",
    ("b_float.parquet", 1): "1 NaN/inf value(s); expected finite values in [0, 1]",
    ("b_float.parquet", 2): "2 NaN/inf value(s)",
    ("h_wrong_len.parquet", 0): "pixel array has 3072 values; expected 64 (= 8x8x1, HWC order)",
    ("h_wrong_len.parquet", 1): "pixel array has 3072 values; expected 64",
    **{("i_bad_page.parquet", r): "cannot read row group 0 of " for r in range(3)},  # footer fine, a page not
}
FAILED = {
    "c_noimage.parquet": "no image column found among ['caption', 'label']",
    "e_schema.parquet": "(schema differs from the first input",
    "f_zero_bytes.parquet": "cannot read Parquet footer",
    "g_truncated.parquet": "cannot read Parquet footer",
}


@pytest.fixture(scope="module")
def bad_run(ckpt: Path, tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("rel-in")
    inp = root / "in"
    inp.mkdir()
    gray = random_images(4, seed=1)
    rgb = random_images(1, channels=3, seed=2)[0]
    big = random_images(1, size=16, seed=3)[0]
    a: list[bytes | None] = [png_bytes(gray[0]), png_bytes(gray[1]), b"\x89PNG\r\n\x1a\n broken", b"", None,
                             bomb_png(20000, 20000), png_bytes(rgb), png_bytes(big), png_bytes(gray[2])]
    write_hf_parquet(inp / "a_hf.parquet", a, labels=list(range(9)), row_group_size=4)
    f = np.random.default_rng(4).random((4, 64)).astype(np.float32)
    f[1, 5] = np.nan
    f[2, 0], f[2, 9] = np.inf, -np.inf
    pq.write_table(pa.table({"pixels": pa.array(list(f), pa.list_(pa.float32()))}), inp / "b_float.parquet")
    pq.write_table(pa.table({"caption": ["x", "y"], "label": [1, 2]}), inp / "c_noimage.parquet")
    pq.write_table(pa.table({"image": pa.array([], HF), "label": pa.array([], pa.int64())}), inp / "d_empty.parquet")
    pq.write_table(pa.table({"image": ["cat.png", "dog.png"], "label": [0, 1]}), inp / "e_schema.parquet")
    (inp / "f_zero_bytes.parquet").write_bytes(b"")
    write_hf_parquet(root / "whole.parquet", [png_bytes(p) for p in random_images(6, seed=5)])
    data = (root / "whole.parquet").read_bytes()
    (inp / "g_truncated.parquet").write_bytes(data[: len(data) * 2 // 3])
    wrong = random_images(2, size=32, channels=3, seed=6).reshape(2, -1)  # pixels for a 32x32 RGB model
    pq.write_table(pa.table({"pixels": pa.array(list(wrong), pa.list_(pa.uint8()))}), inp / "h_wrong_len.parquet")
    write_hf_parquet(root / "page.parquet", [png_bytes(p) for p in random_images(6, seed=7)], row_group_size=3)
    page = bytearray((root / "page.parquet").read_bytes())
    at = pq.read_metadata(root / "page.parquet").row_group(0).column(0).data_page_offset + 20
    page[at : at + 60] = b"\xff" * 60  # garbage in row group 0's first data page
    (inp / "i_bad_page.parquet").write_bytes(bytes(page))
    result = run_score(ScoreOptions(str(ckpt), str(inp), str(root / "out"), run_id="bad", batch_size=4,
                                    resize_policy=Policy.strict), echo=lambda _m: None)
    m = json.loads((root / "out" / "bad" / "_manifest.json").read_text())
    return {"inp": inp, "result": result, "manifest": m, "rows": read_rows(m)}


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_bad_files_are_failed_inputs_and_the_run_is_incomplete(bad_run: dict[str, Any]) -> None:
    r: RunResult = bad_run["result"]
    m, inp = bad_run["manifest"], bad_run["inp"]
    assert (r.status, r.exit_code, m["status"]) == ("incomplete", 3, "incomplete")
    failed = {Path(f["uri"]).name: f["error"] for f in m["failed_inputs"]}
    assert set(failed) == set(FAILED)
    for name, text in FAILED.items():
        assert text in failed[name], (name, failed[name])
    assert "a_hf.parquet" in failed["e_schema.parquet"]  # names the input it differs from
    assert {Path(i["uri"]).name: i["rows"] for i in inputs_of(m)} == {
        "a_hf.parquet": 9, "b_float.parquet": 4, "d_empty.parquet": 0, "h_wrong_len.parquet": 2,
        "i_bad_page.parquet": 6}
    assert all(i["uri"] == str(inp / Path(i["uri"]).name) for i in inputs_of(m))


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_every_row_is_accounted_for_and_only_bad_rows_are_errors(bad_run: dict[str, Any]) -> None:
    m, rows = bad_run["manifest"], bad_run["rows"]
    assert m["rows"] == {"in": 21, "ok": 21 - len(ROW_ERRORS), "error": len(ROW_ERRORS)}
    assert len(rows) == 21 and len({r["id"] for r in rows}) == 21
    errors = {(Path(r["source_path"]).name, r["source_row"]) for r in rows if r["status"] == "error"}
    assert errors == set(ROW_ERRORS)
    assert all(r["latent_loglik"] is not None and r["error"] is None for r in rows if r["status"] == "ok")


@pytest.mark.ray
@pytest.mark.timeout(240)
@pytest.mark.parametrize(("file", "row"), list(ROW_ERRORS), ids=[f"{f}#{r}" for f, r in ROW_ERRORS])
def test_bad_row_is_an_error_row_saying_what_was_expected(bad_run: dict[str, Any], file: str, row: int) -> None:
    (hit,) = [r for r in bad_run["rows"] if Path(r["source_path"]).name == file and r["source_row"] == row]
    assert hit["status"] == "error" and ROW_ERRORS[(file, row)] in hit["error"], hit["error"]
    assert hit["id"] == f"{bad_run['inp'] / file}#{row}"  # the row names its file and row
    assert hit["latent_loglik"] is None and hit["is_ood"] is None and hit["model_id"]


# ---------------------------------------------------------------------------- whole-run problems
@pytest.fixture(scope="module")
def auth_moto(tmp_path_factory: pytest.TempPathFactory, moto_server: str) -> Iterator[str]:
    """A second moto server that checks credentials (INITIAL_NO_AUTH_ACTION_COUNT=0), holding a bucket with a
    checkpoint and a shard put there while authentication was briefly off; only real IAM keys pass (the
    environment holds support.FAKE_KEY_ID, which moto_server set)."""
    import boto3

    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"

    def no_auth_actions(n: int) -> None:
        req = urllib.request.Request(f"{url}/moto-api/reset-auth", data=str(n).encode(), method="POST",
                                     headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(req, timeout=10).read()

    try:
        for _ in range(100):
            try:
                no_auth_actions(1000)
                break
            except OSError:
                time.sleep(0.1)
        c = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id=FAKE_KEY_ID,
                         aws_secret_access_key=FAKE_SECRET)
        c.create_bucket(Bucket="locked")
        ck = make_checkpoint(tmp_path_factory.mktemp("auth") / "m")
        for name in ("config.json", "weights.safetensors"):
            c.put_object(Bucket="locked", Key=f"m/{name}", Body=(ck / name).read_bytes())
        buf = io.BytesIO()
        pq.write_table(pa.table({"image": [png_bytes(p) for p in random_images(2)]}), buf)
        c.put_object(Bucket="locked", Key="data/a.parquet", Body=buf.getvalue())
        no_auth_actions(0)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def whole_run_cases(tmp: Path, ckpt: Path) -> dict[str, tuple[list[str], str]]:
    (tmp / "in").mkdir()
    write_hf_parquet(tmp / "in" / "a.parquet", [png_bytes(p) for p in random_images(2)])
    tampered = tmp / "tampered"
    tampered.mkdir()
    (tampered / "config.json").write_bytes((ckpt / "config.json").read_bytes())
    w = bytearray((ckpt / "weights.safetensors").read_bytes())
    w[-1] ^= 0x01  # one bit of one weight
    (tampered / "weights.safetensors").write_bytes(bytes(w))
    good = ["--model", str(ckpt), "--input", str(tmp / "in")]
    return {
        "input-missing": (["--model", str(ckpt), "--input", str(tmp / "nope")], f"input path '{tmp / 'nope'}' does not exist"),
        "checkpoint-missing": (["--model", str(tmp / "no-ckpt"), "--input", str(tmp / "in")], "has no config.json"),
        "checkpoint-tampered": (["--model", str(tampered), "--input", str(tmp / "in")],
                                "but config.json records"),
        "input-bucket-missing": (["--model", str(ckpt), "--input", "s3://no-such-bucket-nrm/data"],
                                 "bucket 'no-such-bucket-nrm' does not exist"),
        "output-bucket-missing": (good, "bucket 'no-such-bucket-nrm' does not exist"),
        "model-bucket-missing": (["--model", "s3://no-such-bucket-nrm/m", "--input", str(tmp / "in")],
                                 "bucket 'no-such-bucket-nrm' does not exist"),
    }


@pytest.mark.s3
@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["input-missing", "checkpoint-missing", "checkpoint-tampered", "input-bucket-missing",
                                  "output-bucket-missing", "model-bucket-missing"])
def test_whole_run_problem_is_one_sentence_and_writes_nothing(case: str, ckpt: Path, tmp_path: Path,
                                                              moto_server: str) -> None:
    args, text = whole_run_cases(tmp_path, ckpt)[case]
    output = "s3://no-such-bucket-nrm/out" if case == "output-bucket-missing" else str(tmp_path / "out")
    r = runner.invoke(app, ["score", *args, "--output", output, "--run-id", "w"])
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], r.stderr
    assert "Traceback" not in r.output
    assert not (tmp_path / "out").exists()


@pytest.mark.s3
@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["output", "input", "model"])
def test_wrong_credentials_are_one_sentence_and_write_nothing(where: str, auth_moto: str, ckpt: Path,
                                                              tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    write_hf_parquet(tmp_path / "in" / "a.parquet", [png_bytes(p) for p in random_images(2)])
    paths = {"model": str(ckpt), "input": str(tmp_path / "in"), "output": str(tmp_path / "out")}
    paths[where] = {"model": "s3://locked/m", "input": "s3://locked/data", "output": "s3://locked/out"}[where]
    r = runner.invoke(app, ["score", "--model", paths["model"], "--input", paths["input"], "--output", paths["output"],
                            "--run-id", "w", "--endpoint-url", auth_moto])
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "credentials" in lines[0] and "InvalidAccessKeyId" in lines[0] and "locked" in lines[0], lines[0]
    assert FAKE_KEY_ID not in r.output and FAKE_SECRET not in r.output
    assert not (tmp_path / "out").exists()
