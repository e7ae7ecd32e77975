"""jobs.storage and checkpoint fetching on the local filesystem (no Ray, no S3)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import manifest
from jobs.pipeline import Checkpoint, JobError, Run, ScoreOptions
from jobs.pipeline.checkpoint import CACHE_ENV
from jobs.pipeline.options import checked
from jobs.pipeline.run import Pool
from jobs.storage import AlreadyCommitted, FileInfo, StorageError, Store, absolute, join, split_s3


def touch_parquet(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"x": [1]}), path)
    return path


def test_join_and_split() -> None:
    assert join("s3://b/p/", "/run/", "x.json") == "s3://b/p/run/x.json"
    assert split_s3("s3://bucket/a/b") == ("bucket", "a/b")
    assert split_s3("s3://bucket") == ("bucket", "")
    with pytest.raises(StorageError, match="not an s3://bucket/key URI"):
        split_s3("s3:///key")


def test_local_put_if_absent_commits_once(tmp_path: Path) -> None:
    uri = str(tmp_path / "run" / "_manifest.json")
    Store().put_if_absent(uri, b'{"a": 1}')
    with pytest.raises(AlreadyCommitted, match="already exists"):
        Store().put_if_absent(uri, b'{"a": 2}')
    assert Path(uri).read_bytes() == b'{"a": 1}'
    assert os.listdir(tmp_path / "run") == ["_manifest.json"]  # no temp file left behind


def test_manifest_commit_and_committed_runs(tmp_path: Path) -> None:
    out = str(tmp_path)
    store = Store()
    manifest.commit(store, out, "b", {"created": "2024-01-02"})
    manifest.commit(store, out, "a", {"created": "2024-01-03"})
    (tmp_path / "uncommitted" / "attempt-1").mkdir(parents=True)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "_manifest.json").write_text('{"format": "other"}')
    runs = manifest.committed_runs(store, out)
    assert [r.run_id for r in runs] == ["b", "a"]  # oldest first
    with pytest.raises(AlreadyCommitted):
        manifest.commit(store, out, "a", {})
    assert json.loads((tmp_path / "a" / "_manifest.json").read_text())["format"] == "nrm-run-manifest"


def test_committed_runs_of_a_missing_output_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="nope' does not exist"):
        manifest.committed_runs(Store(), str(tmp_path / "nope"), must_exist=True)


def test_covered_reads_only_the_newest_committed_runs_list(tmp_path: Path) -> None:
    out, store = str(tmp_path), Store()
    assert manifest.covered(store, out + "/missing") == set()
    old = manifest.write_list(store, out + "/r1/x/_covered.parquet", [{"uri": "u1", "version": "1"}],
                              manifest.COVERED_SCHEMA)
    manifest.point(store, out, "r1")
    manifest.commit(store, out, "r1", {"covered": old})
    new = manifest.write_covered(store, out + "/r2/x/_covered.parquet", manifest.covered(store, out),
                                 [FileInfo("u2", 1, "2")])
    manifest.point(store, out, "r2")
    manifest.commit(store, out, "r2", {"covered": new})
    manifest.point(store, out, "r3")  # pointed at, never committed: skipped
    os.unlink(tmp_path / "r1" / "x" / "_covered.parquet")  # history is not read again
    assert manifest.covered(store, out) == {("u1", "1"), ("u2", "2")}


def test_manifests_with_inline_lists_still_read(tmp_path: Path) -> None:
    """Runs committed before the lists moved beside the manifest: outputs() and --incremental still read them."""
    out, store = str(tmp_path), Store()
    manifest.commit(store, out, "old", {"created": "2024-01-01", "inputs": [{"uri": "u1", "version": "1", "rows": 3}],
                                        "outputs": [{"uri": "o1", "rows": 3}]})
    m = manifest.read(store, out, "old")
    assert m is not None and manifest.outputs(store, m) == [{"uri": "o1", "rows": 3}]
    assert manifest.covered(store, out) == {("u1", "1")}


def test_a_list_that_does_not_match_its_hash_is_refused(tmp_path: Path) -> None:
    ref = manifest.write_list(Store(), str(tmp_path / "l.parquet"), [{"uri": "u", "version": "1"}],
                              manifest.COVERED_SCHEMA)
    pq.write_table(pa.table({"uri": ["v"], "version": ["1"]}), tmp_path / "l.parquet")
    with pytest.raises(StorageError, match="does not match the sha256 its manifest records"):
        manifest.read_list(Store(), ref)


def test_list_parquet_dir_glob_file(tmp_path: Path) -> None:
    a = touch_parquet(tmp_path / "d" / "a.parquet")
    b = touch_parquet(tmp_path / "d" / "sub" / "b.parquet")
    touch_parquet(tmp_path / "d" / "_SUCCESS.parquet")
    touch_parquet(tmp_path / "d" / ".hidden.parquet")
    (tmp_path / "d" / "notes.txt").write_text("x")
    store = Store()
    assert [f.uri for f in store.list_parquet(str(tmp_path / "d"))] == [str(a), str(b)]
    assert [f.uri for f in store.list_parquet(str(tmp_path / "d" / "*.parquet"))] == [str(a)]
    assert [f.uri for f in store.list_parquet(str(tmp_path / "d" / "**" / "*.parquet"))] == [str(a), str(b)]
    one = store.list_parquet(str(b))
    assert [(f.uri, f.size, f.version) for f in one] == [(str(b), b.stat().st_size, str(b.stat().st_mtime_ns))]
    assert [f.uri for f in store.list_parquet("file://" + str(a))] == [str(a)]


def test_list_parquet_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=f"input path '{tmp_path / 'nope'}' does not exist"):
        Store().list_parquet(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(StorageError, match="no .parquet files found at"):
        Store().list_parquet(str(tmp_path / "empty"))


def test_checkpoint_fetch(tiny_ckpt: Path) -> None:
    import nrm

    ck = Checkpoint.fetch(Store(), str(tiny_ckpt))
    assert ck.model_id == nrm.model_id(tiny_ckpt)
    assert set(ck.files) == {"config.json", "weights.safetensors"}


def test_checkpoint_fetch_errors_name_the_uri_not_a_temp_dir(tiny_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(JobError, match="has no config.json"):
        Checkpoint.fetch(Store(), str(tmp_path / "missing"))
    w = tiny_ckpt / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(JobError, match="tampered or replaced") as e:
        Checkpoint.fetch(Store(), str(tiny_ckpt))
    assert str(tiny_ckpt) in str(e.value) and "nrm-ckpt-" not in str(e.value)


# ---------------------------------------------------------------------------- the scoring actors' checkpoint
@pytest.fixture
def node_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "node-cache"))
    return tmp_path / "node-cache"


def test_scoring_actors_are_handed_the_checkpoint_by_reference_not_its_bytes(tiny_ckpt: Path, tmp_path: Path,
                                                                             node_cache: Path) -> None:
    import ray

    opts, run_id = checked(ScoreOptions(str(tiny_ckpt), str(tmp_path), str(tmp_path / "out")))
    args = Run(Store(), opts, run_id, echo=lambda _m: None).scorer_args(Pool(1, 1.0, 0.0, 0.5))
    blob = ray.cloudpickle.dumps(args)
    assert (tiny_ckpt / "weights.safetensors").read_bytes() not in blob
    assert b"ObjectRef" not in blob
    assert args["checkpoint"].uri == str(tiny_ckpt)


def test_the_node_cache_serves_a_restarted_actor_when_the_source_is_gone(tiny_ckpt: Path, node_cache: Path) -> None:
    import torch

    import nrm

    ref = Checkpoint.fetch(Store(), str(tiny_ckpt)).ref(Store())  # the driver seeds its node's cache
    want = nrm.load(tiny_ckpt).state_dict()
    for f in tiny_ckpt.iterdir():
        f.unlink()
    got = ref.load().state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_a_cached_copy_that_fails_its_hash_is_fetched_again(tiny_ckpt: Path, node_cache: Path) -> None:
    ref = Checkpoint.fetch(Store(), str(tiny_ckpt)).ref(Store())
    cached = Path(ref.cache_dir) / "weights.safetensors"
    data = bytearray(cached.read_bytes())
    data[-1] ^= 0xFF
    cached.write_bytes(bytes(data))
    ref.load()
    assert cached.read_bytes() == (tiny_ckpt / "weights.safetensors").read_bytes()


# ---------------------------------------------------------------------------- bugs
def test_file_uri_objects(tiny_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # where the stray ./file:/ tree would be created
    uri = f"file://{tmp_path}/out/run/_manifest.json"
    Store().put_if_absent(uri, b"{}")
    stray = (tmp_path / "file:").exists()
    assert (tmp_path / "out" / "run" / "_manifest.json").is_file(), f"written elsewhere (./file: exists: {stray})"
    assert Checkpoint.fetch(Store(), f"file://{tiny_ckpt}").model_id


def test_list_parquet_skips_hidden_directories(tmp_path: Path) -> None:
    a = touch_parquet(tmp_path / "a.parquet")
    touch_parquet(tmp_path / "_temporary" / "0" / "part-0.parquet")
    touch_parquet(tmp_path / ".staging" / "part-1.parquet")
    assert [f.uri for f in Store().list_parquet(str(tmp_path))] == [str(a)]


def test_absolute_resolves_local_paths_and_keeps_s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert absolute("data/a.parquet") == str(tmp_path / "data" / "a.parquet")
    assert absolute(f"file://{tmp_path}/x/../y") == str(tmp_path / "y")
    assert absolute("s3://bucket/rel/../key") == "s3://bucket/rel/../key"
