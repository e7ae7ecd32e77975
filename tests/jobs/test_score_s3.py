"""`run_score` with model, input and output on s3:// (moto's real HTTP server) and the S3 commit primitive."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from support import inputs_of, make_checkpoint, outputs_of, png_bytes, random_images, write_hf_parquet

import nrm
from jobs.pipeline import JobError, RunResult, ScoreOptions, run_score
from jobs.storage import AlreadyCommitted, StorageError, Store

pytestmark = pytest.mark.s3


def s3(moto_server: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=moto_server)


def upload_shard(client: Any, bucket: str, key: str, images: list[bytes | None], tmp_path: Path) -> None:
    local = tmp_path / key.replace("/", "_")
    write_hf_parquet(local, images, labels=[1] * len(images), row_group_size=3)
    client.upload_file(str(local), bucket, key)


def keys(client: Any, bucket: str, prefix: str = "") -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"] for p in pages for o in p.get("Contents", [])}


def get_json(client: Any, bucket: str, key: str) -> dict[str, Any]:
    return json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())


def score(model: str, input: str, output: str, run_id: str, **kw: Any) -> RunResult:
    return run_score(ScoreOptions(model, input, output, run_id=run_id, batch_size=8, **kw), echo=lambda _m: None)


@pytest.fixture(scope="module")
def ray_sees_moto(moto_server: str, ray_local: None) -> None:
    """Ray workers build their S3 clients from their own environment, which they inherit when Ray starts.
    If the session's Ray runtime started before moto's AWS_* variables were set, restart it so they see them."""
    import ray

    @ray.remote(num_cpus=0)
    def endpoint() -> str | None:
        import os

        return os.environ.get("AWS_ENDPOINT_URL")

    if ray.get(endpoint.remote()) != moto_server:
        ray.shutdown()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)


@pytest.fixture
def staged(moto_server: str, s3_bucket: str, tmp_path: Path) -> dict[str, Any]:
    """A checkpoint and two shards uploaded to the bucket; row 4 of a.parquet is corrupt."""
    client = s3(moto_server)
    ckpt = make_checkpoint(tmp_path / "ckpt")
    for f in ("config.json", "weights.safetensors"):
        client.upload_file(str(ckpt / f), s3_bucket, f"models/m/{f}")
    px_a, px_b = random_images(7, seed=21), random_images(4, seed=22)
    imgs_a: list[bytes | None] = [png_bytes(p) for p in px_a]
    imgs_a[4] = b"garbage"
    upload_shard(client, s3_bucket, "data/a.parquet", imgs_a, tmp_path)
    upload_shard(client, s3_bucket, "data/part/b.parquet", [png_bytes(p) for p in px_b], tmp_path)
    b = f"s3://{s3_bucket}"
    return {"client": client, "bucket": s3_bucket, "ckpt": ckpt, "px_a": px_a, "px_b": px_b,
            "model": f"{b}/models/m", "input": f"{b}/data", "output": f"{b}/scores"}


@pytest.mark.ray
@pytest.mark.usefixtures("ray_sees_moto")
def test_s3_end_to_end_commit_once(staged: dict[str, Any], moto_server: str) -> None:
    client, bucket = staged["client"], staged["bucket"]
    r = score(staged["model"], staged["input"], staged["output"], "s1")
    assert (r.status, r.exit_code) == ("complete", 0)
    assert r.manifest_uri == f"s3://{bucket}/scores/s1/_manifest.json"
    m = get_json(client, bucket, "scores/s1/_manifest.json")
    assert m["run_id"] == "s1" and m["status"] == "complete"
    assert m["rows"] == {"in": 11, "ok": 10, "error": 1}
    assert m["model"]["model_id"] == nrm.model_id(staged["ckpt"])
    etags = {k: client.head_object(Bucket=bucket, Key=k)["ETag"].strip('"')
             for k in ("data/a.parquet", "data/part/b.parquet")}
    assert [(i["uri"], i["version"], i["rows"]) for i in inputs_of(m)] == [
        (f"s3://{bucket}/{k}", etags[k], n) for k, n in (("data/a.parquet", 7), ("data/part/b.parquet", 4))]
    assert all(o["uri"].startswith(f"s3://{bucket}/scores/s1/attempt-") for o in outputs_of(m))

    host = moto_server.split("://", 1)[1]
    fs = pafs.S3FileSystem(endpoint_override=host, scheme="http", region="us-east-1")
    t = pa.concat_tables([pq.read_table(o["uri"][len("s3://"):], filesystem=fs) for o in outputs_of(m)])
    t = t.sort_by([("source_path", "ascending"), ("source_row", "ascending")])
    assert t.num_rows == 11 and t["source_row"].to_pylist() == list(range(7)) + list(range(4))
    assert t["id"][4].as_py() == f"s3://{bucket}/data/a.parquet#4"
    assert (t["status"][4].as_py(), t["error"][4].as_py()[:21]) == ("error", "cannot decode image (")
    model = nrm.load(staged["ckpt"])
    px = np.concatenate([np.delete(staged["px_a"], 4, 0), staged["px_b"]])
    ref = model.score(model.preprocess(torch.from_numpy(px)))["latent_loglik"].double().numpy()
    ok = t.filter(pa.compute.equal(t["status"], "ok"))
    np.testing.assert_allclose(ok["latent_loglik"].to_numpy(), ref, rtol=1e-5, atol=1e-5)
    assert ok["is_ood"].to_pylist() == (ref < m["threshold"]["value"]).tolist()

    before = keys(client, bucket)
    again = score(staged["model"], staged["input"], staged["output"], "s1")
    assert (again.status, again.exit_code) == ("already-committed", 0)
    assert again.manifest["rows"] == m["rows"]
    assert keys(client, bucket) == before


@pytest.mark.ray
@pytest.mark.usefixtures("ray_sees_moto")
def test_s3_incremental(staged: dict[str, Any], tmp_path: Path) -> None:
    client, bucket = staged["client"], staged["bucket"]
    r1 = score(staged["model"], staged["input"], staged["output"], "i1", incremental=True)
    assert r1.status == "complete" and r1.manifest["rows"]["in"] == 11
    upload_shard(client, bucket, "data/c.parquet", [png_bytes(p) for p in random_images(2, seed=23)], tmp_path)
    r2 = score(staged["model"], staged["input"], staged["output"], "i2", incremental=True)
    assert [i["uri"] for i in inputs_of(r2.manifest)] == [f"s3://{bucket}/data/c.parquet"]
    assert r2.manifest["rows"] == {"in": 2, "ok": 2, "error": 0}
    before = keys(client, bucket)
    r3 = score(staged["model"], staged["input"], staged["output"], "i3", incremental=True)
    assert (r3.status, r3.exit_code) == ("nothing-to-do", 0)
    assert keys(client, bucket) == before


@pytest.mark.parametrize("which", ["output", "input", "model"])
def test_missing_bucket_is_a_job_error_naming_it(staged: dict[str, Any], which: str) -> None:
    paths = {"model": staged["model"], "input": staged["input"], "output": staged["output"]}
    paths[which] = "s3://no-such-bucket-nrm/x"
    with pytest.raises(JobError, match="no-such-bucket-nrm"):
        score(paths["model"], paths["input"], paths["output"], "nb")
    assert not any(k.startswith("scores/") for k in keys(staged["client"], staged["bucket"]))


def test_conditional_put_refuses_the_second_writer(moto_server: str, s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/runs/r/_manifest.json"
    Store().put_if_absent(uri, b'{"first": true}')
    with pytest.raises(AlreadyCommitted, match="already exists"):
        Store().put_if_absent(uri, b'{"second": true}')
    assert Store().read_json(uri) == {"first": True}


def test_s3_read_errors(moto_server: str, s3_bucket: str) -> None:
    with pytest.raises(FileNotFoundError):
        Store().read_bytes(f"s3://{s3_bucket}/nothing/here.json")
    with pytest.raises(StorageError, match=f"no .parquet files found at 's3://{s3_bucket}/empty'"):
        Store().list_parquet(f"s3://{s3_bucket}/empty")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-nrm' does not exist"):
        Store().check_bucket("s3://no-such-bucket-nrm/x")


def test_s3_list_parquet_prefix_and_file(moto_server: str, s3_bucket: str) -> None:
    client = s3(moto_server)
    for k in ("d/a.parquet", "d/sub/b.parquet", "d/_SUCCESS.parquet", "d/notes.txt", "dx/c.parquet"):
        client.put_object(Bucket=s3_bucket, Key=k, Body=b"x")
    got = [f.uri for f in Store().list_parquet(f"s3://{s3_bucket}/d")]
    assert got == [f"s3://{s3_bucket}/d/a.parquet", f"s3://{s3_bucket}/d/sub/b.parquet"]
    one = Store().list_parquet(f"s3://{s3_bucket}/d/a.parquet")
    assert [(f.uri, f.size) for f in one] == [(f"s3://{s3_bucket}/d/a.parquet", 1)]


def test_s3_glob_matches_like_a_local_glob(moto_server: str, s3_bucket: str) -> None:
    client = s3(moto_server)
    for k in ("d/a.parquet", "d/sub/b.parquet"):
        client.put_object(Bucket=s3_bucket, Key=k, Body=io.BytesIO(b"x"))
    assert [f.uri for f in Store().list_parquet(f"s3://{s3_bucket}/d/*.parquet")] == [f"s3://{s3_bucket}/d/a.parquet"]


def test_s3_listing_is_one_paginated_listing_with_one_cached_client(moto_server: str, s3_bucket: str) -> None:
    """ListObjectsV2 already returns size and ETag: no HEAD per object, and no new client per call."""
    client = s3(moto_server)
    for i in range(1005):  # two pages of 1,000 keys
        client.put_object(Bucket=s3_bucket, Key=f"many/f{i:04d}.parquet", Body=b"x" * (i % 7))
    store = Store()
    assert store.s3() is Store().s3()
    calls: list[str] = []

    def record(model: Any, **_: Any) -> None:
        calls.append(model.name)

    store.s3().meta.events.register("before-call.s3", record)
    try:
        files = store.list_parquet(f"s3://{s3_bucket}/many")
    finally:
        store.s3().meta.events.unregister("before-call.s3", record)
    assert calls == ["HeadBucket", "ListObjectsV2", "ListObjectsV2"]
    assert len(files) == 1005 and files[3].size == 3
    assert files[3].version == client.head_object(Bucket=s3_bucket, Key="many/f0003.parquet")["ETag"].strip('"')
