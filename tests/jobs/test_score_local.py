"""`run_score` end to end on local Parquet files, on the session's embedded 2-CPU Ray runtime."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from support import inputs_of, make_checkpoint, outputs_of, png_bytes, random_images, write_hf_parquet

import nrm
from jobs.pipeline import JobError, RunResult, ScoreOptions, run_score
from jobs.storage import Store

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_local")]

CONTRACT = ["id", "source_path", "source_row", "label", "status", "error", "pred", "max_softmax", "max_logit",
            "energy", "latent_prior", "latent_loglik", "recon_sq_error", "loglik_bound", "latent_prior_layers",
            "ood_score", "is_ood", "model_id"]
SCALARS = ["max_softmax", "max_logit", "energy", "latent_prior", "latent_loglik", "recon_sq_error", "loglik_bound"]


def score(model: Path | str, input: Path | str, output: Path | str, run_id: str, **kw: Any) -> RunResult:
    return run_score(ScoreOptions(str(model), str(input), str(output), run_id=run_id, **{"batch_size": 8, **kw}),
                     echo=lambda _msg: None)


def read_manifest(output: Path, run_id: str) -> dict[str, Any]:
    return json.loads((output / run_id / "_manifest.json").read_text())


def read_outputs(m: dict[str, Any]) -> pa.Table:
    t = pa.concat_tables([pq.read_table(o["uri"]) for o in outputs_of(m)])
    assert sum(o["rows"] for o in outputs_of(m)) == t.num_rows
    return t.sort_by([("source_path", "ascending"), ("source_row", "ascending")])


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def reference_scores(ckpt: Path, pixels: np.ndarray) -> dict[str, np.ndarray]:
    model = nrm.load(ckpt)
    cols = model.score(model.preprocess(torch.from_numpy(pixels)))
    return {k: v.double().numpy() for k, v in cols.items()}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "m")


# ---------------------------------------------------------------------------- one HF-layout run, many checks
@pytest.fixture(scope="module")
def hf_run(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two HF-layout files with labels and several row groups; row 5 of the first is corrupt."""
    root = tmp_path_factory.mktemp("hf")
    (root / "in").mkdir()
    px_a, px_b = random_images(10, seed=1), random_images(7, seed=2)
    imgs_a = [png_bytes(p) for p in px_a]
    imgs_a[5] = b"\x89PNG\r\n\x1a\n not really"
    write_hf_parquet(root / "in" / "a.parquet", imgs_a, labels=[i % 3 for i in range(10)], row_group_size=4)
    write_hf_parquet(root / "in" / "b.parquet", [png_bytes(p) for p in px_b], labels=[2] * 7, row_group_size=3)
    assert pq.ParquetFile(root / "in" / "a.parquet").metadata.num_row_groups == 3
    result = score(ckpt, root / "in", root / "out", "r1")
    return {"root": root, "result": result, "pixels": {"a.parquet": px_a, "b.parquet": px_b},
            "a": str(root / "in" / "a.parquet"), "b": str(root / "in" / "b.parquet")}


def test_hf_run_completes_and_accounts_for_every_row(hf_run: dict[str, Any]) -> None:
    r: RunResult = hf_run["result"]
    assert (r.status, r.exit_code) == ("complete", 0)
    m = read_manifest(hf_run["root"] / "out", "r1")
    assert m == r.manifest | {"format": "nrm-run-manifest", "version": 1, "run_id": "r1", "versions": m["versions"]}
    assert r.manifest_uri == str(hf_run["root"] / "out" / "r1" / "_manifest.json")
    assert m["rows"] == {"in": 17, "ok": 16, "error": 1}
    assert m["rows"]["in"] == m["rows"]["ok"] + m["rows"]["error"]
    assert m["failed_inputs"] == []
    assert [(i["uri"], i["rows"]) for i in inputs_of(m)] == [(hf_run["a"], 10), (hf_run["b"], 7)]
    t = read_outputs(m)
    assert t.num_rows == 17
    assert m["flagged_ood"] == sum(t["is_ood"].to_pylist()[i] or 0 for i in range(17))


def test_output_columns_are_exactly_the_contract(hf_run: dict[str, Any]) -> None:
    t = read_outputs(read_manifest(hf_run["root"] / "out", "r1"))
    assert t.column_names == CONTRACT
    assert t.schema.field("source_row").type == pa.int64()
    assert t.schema.field("latent_prior_layers").type == pa.list_(pa.float64())
    assert set(pa.compute.list_value_length(t["latent_prior_layers"]).drop_null().to_pylist()) == {2}


def test_default_ids_and_source_rows(hf_run: dict[str, Any]) -> None:
    t = read_outputs(read_manifest(hf_run["root"] / "out", "r1"))
    expect = [(hf_run["a"], r) for r in range(10)] + [(hf_run["b"], r) for r in range(7)]
    assert list(zip(t["source_path"].to_pylist(), t["source_row"].to_pylist(), strict=True)) == expect
    assert t["id"].to_pylist() == [f"{p}#{r}" for p, r in expect]
    assert t["label"].to_pylist() == [i % 3 for i in range(10)] + [2] * 7


def test_corrupt_row_is_kept_as_an_error_row(hf_run: dict[str, Any]) -> None:
    t = read_outputs(read_manifest(hf_run["root"] / "out", "r1")).to_pylist()
    bad = [row for row in t if row["status"] == "error"]
    assert len(bad) == 1
    row = bad[0]
    assert (row["source_path"], row["source_row"]) == (hf_run["a"], 5)
    assert row["error"].startswith("cannot decode image (")
    assert all(row[c] is None for c in ["pred", *SCALARS, "latent_prior_layers", "ood_score", "is_ood"])
    assert row["model_id"] and row["label"] == 2
    assert all(r["error"] is None for r in t if r["status"] == "ok")


def test_scores_match_the_model_on_the_same_pixels(hf_run: dict[str, Any], ckpt: Path) -> None:
    t = read_outputs(read_manifest(hf_run["root"] / "out", "r1"))
    for name, px in hf_run["pixels"].items():
        sel = [i for i, p in enumerate(t["source_path"].to_pylist()) if p.endswith(name)]
        rows = t.take(sel)
        ok = np.array([s == "ok" for s in rows["status"].to_pylist()])
        ref = reference_scores(ckpt, px[ok])
        assert rows.filter(pa.array(ok))["pred"].to_pylist() == ref["pred"].astype(int).tolist()
        for c in SCALARS:
            got = rows.filter(pa.array(ok))[c].to_numpy()
            np.testing.assert_allclose(got, ref[c], rtol=1e-5, atol=1e-5, err_msg=c)
        layers = np.array(rows.filter(pa.array(ok))["latent_prior_layers"].to_pylist())
        np.testing.assert_allclose(layers, ref["latent_prior_layers"], rtol=1e-5, atol=1e-5)


def test_model_id_and_threshold_columns(hf_run: dict[str, Any], ckpt: Path) -> None:
    m = read_manifest(hf_run["root"] / "out", "r1")
    t = read_outputs(m).to_pylist()
    sha = hashlib.sha256((ckpt / "weights.safetensors").read_bytes()).hexdigest()
    th = json.loads((ckpt / "config.json").read_text())["threshold"]
    assert th["score"] == "latent_loglik"
    config_sha = hashlib.sha256((ckpt / "config.json").read_bytes()).hexdigest()
    assert m["model"] == {"uri": str(ckpt), "model_id": sha, "config_sha256": config_sha}
    assert m["threshold"]["value"] == th["value"]
    assert {r["model_id"] for r in t} == {sha}
    ok = [r for r in t if r["status"] == "ok"]
    for r in ok:
        assert r["ood_score"] == -r["latent_loglik"]
        assert r["is_ood"] == (r["latent_loglik"] < th["value"])
    assert m["flagged_ood"] == sum(r["is_ood"] for r in ok)


def test_committed_run_id_is_never_redone(hf_run: dict[str, Any], ckpt: Path) -> None:
    out = hf_run["root"] / "out"
    before = tree(out)
    manifest_bytes = (out / "r1" / "_manifest.json").read_bytes()
    r = score(ckpt, hf_run["root"] / "in", out, "r1")
    assert (r.status, r.exit_code) == ("already-committed", 0)
    assert r.manifest["rows"]["in"] == 17
    assert tree(out) == before
    assert (out / "r1" / "_manifest.json").read_bytes() == manifest_bytes


# ---------------------------------------------------------------------------- other layouts
def test_id_column_is_used_when_present(ckpt: Path, tmp_path: Path) -> None:
    px = random_images(6, seed=3)
    table = pa.table({"id": [f"img-{i:02d}" for i in range(6)],
                      "image": pa.array([{"bytes": png_bytes(p), "path": None} for p in px],
                                        pa.struct([("bytes", pa.binary()), ("path", pa.string())]))})
    pq.write_table(table, tmp_path / "ids.parquet", row_group_size=4)
    r = score(ckpt, tmp_path / "ids.parquet", tmp_path / "out", "ids")
    assert r.status == "complete"
    t = read_outputs(r.manifest)
    assert t["id"].to_pylist() == [f"img-{i:02d}" for i in range(6)]
    assert t["source_row"].to_pylist() == list(range(6))
    assert t["label"].null_count == t.num_rows  # no label column in the input: the column is all null
    assert set(t["status"].to_pylist()) == {"ok"}


def test_raw_uint8_pixel_column(ckpt: Path, tmp_path: Path) -> None:
    px = random_images(9, seed=4)
    cells = [p.ravel().tolist() for p in px]
    cells[4] = [1, 2, 3]  # wrong size: an error row
    pq.write_table(pa.table({"pixels": pa.array(cells, pa.list_(pa.uint8())), "label": list(range(9))}),
                   tmp_path / "raw.parquet", row_group_size=5)
    r = score(ckpt, tmp_path / "raw.parquet", tmp_path / "out", "raw")
    assert r.manifest["rows"] == {"in": 9, "ok": 8, "error": 1}
    t = read_outputs(r.manifest)
    assert t["status"].to_pylist() == ["ok"] * 4 + ["error"] + ["ok"] * 4
    assert "has 3 values; expected 64" in t["error"][4].as_py()
    ok = np.array(t["status"].to_pylist()) == "ok"
    ref = reference_scores(ckpt, px[ok])
    np.testing.assert_allclose(t.filter(pa.array(ok))["latent_loglik"].to_numpy(), ref["latent_loglik"],
                               rtol=1e-5, atol=1e-5)


def test_plain_binary_column(ckpt: Path, tmp_path: Path) -> None:
    px = random_images(5, seed=5)
    pq.write_table(pa.table({"jpeg_or_png": pa.array([png_bytes(p) for p in px], pa.binary())}),
                   tmp_path / "bin.parquet")
    r = score(ckpt, tmp_path / "bin.parquet", tmp_path / "out", "bin")
    assert r.manifest["rows"] == {"in": 5, "ok": 5, "error": 0}
    t = read_outputs(r.manifest)
    np.testing.assert_allclose(t["latent_loglik"].to_numpy(), reference_scores(ckpt, px)["latent_loglik"],
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- incremental
def test_incremental_scores_only_new_files_then_nothing(ckpt: Path, tmp_path: Path) -> None:
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    write_hf_parquet(inp / "a.parquet", [png_bytes(p) for p in random_images(4, seed=6)])
    r1 = score(ckpt, inp, out, "i1", incremental=True)
    assert r1.status == "complete" and r1.manifest["rows"]["in"] == 4
    write_hf_parquet(inp / "b.parquet", [png_bytes(p) for p in random_images(3, seed=7)])
    r2 = score(ckpt, inp, out, "i2", incremental=True)
    assert r2.status == "complete"
    assert [i["uri"] for i in inputs_of(r2.manifest)] == [str(inp / "b.parquet")]
    assert r2.manifest["rows"] == {"in": 3, "ok": 3, "error": 0}
    assert set(read_outputs(r2.manifest)["source_path"].to_pylist()) == {str(inp / "b.parquet")}
    before = tree(out)
    r3 = score(ckpt, inp, out, "i3", incremental=True)
    assert (r3.status, r3.exit_code) == ("nothing-to-do", 0)
    assert tree(out) == before


def test_incremental_fails_in_one_sentence_when_the_output_cannot_be_listed(ckpt: Path, tmp_path: Path) -> None:
    # a listing error must not read as "nothing committed yet", which would score everything again
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    write_hf_parquet(inp / "a.parquet", [png_bytes(p) for p in random_images(2, seed=6)])
    out.mkdir()
    (out / "_index").write_text("not a directory")
    with pytest.raises(JobError, match=r"^cannot list '.*/out/_index': .*; nothing was scored$"):
        score(ckpt, inp, out, "e1", incremental=True)
    assert sorted(p.name for p in out.iterdir()) == ["_index"]


def test_incremental_fails_when_the_covered_list_was_altered(ckpt: Path, tmp_path: Path) -> None:
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    write_hf_parquet(inp / "a.parquet", [png_bytes(p) for p in random_images(2, seed=6)])
    r1 = score(ckpt, inp, out, "c1", incremental=True)
    pq.write_table(pa.table({"uri": ["x"], "version": ["y"]}), r1.manifest["covered"]["uri"])
    with pytest.raises(JobError, match="_covered.parquet does not match the sha256 its manifest records"):
        score(ckpt, inp, out, "c2", incremental=True)
    assert not (out / "c2").exists()


# ---------------------------------------------------------------------------- failed inputs
def test_unreadable_and_foreign_files_are_listed_failed_inputs(ckpt: Path, tmp_path: Path) -> None:
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    write_hf_parquet(inp / "a_good.parquet", [png_bytes(p) for p in random_images(5, seed=8)], labels=[0] * 5)
    pq.write_table(pa.table({"caption": ["x", "y"], "label": [1, 2]}), inp / "b_noimage.parquet")
    write_hf_parquet(tmp_path / "full.parquet", [png_bytes(p) for p in random_images(6, seed=9)])
    data = (tmp_path / "full.parquet").read_bytes()
    (inp / "c_truncated.parquet").write_bytes(data[: len(data) // 2])
    r = score(ckpt, inp, out, "bad")
    assert (r.status, r.exit_code) == ("incomplete", 3)
    m = read_manifest(out, "bad")
    assert m["status"] == "incomplete"
    assert [i["uri"] for i in inputs_of(m)] == [str(inp / "a_good.parquet")]
    failed = {f["uri"]: f["error"] for f in m["failed_inputs"]}
    assert set(failed) == {str(inp / "b_noimage.parquet"), str(inp / "c_truncated.parquet")}
    assert "no image column" in failed[str(inp / "b_noimage.parquet")]
    assert "'caption'" in failed[str(inp / "b_noimage.parquet")]
    assert "schema differs from the first input" in failed[str(inp / "b_noimage.parquet")]
    assert failed[str(inp / "c_truncated.parquet")].startswith("cannot read Parquet footer")
    assert m["rows"] == {"in": 5, "ok": 5, "error": 0}
    assert read_outputs(m).num_rows == 5


def test_a_run_whose_every_input_failed_commits_nothing(ckpt: Path, tmp_path: Path) -> None:
    # an `incomplete` run of 0 rows would make the corrected command skip its run id
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "junk.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    with pytest.raises(JobError, match=r"every input file failed \(1; first .*junk.parquet: cannot read Parquet "
                                       r"footer.*nothing was committed"):
        score(ckpt, tmp_path / "in", tmp_path / "out", "junk")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- options and pool sizing
def test_pool_larger_than_the_cluster_is_refused(ckpt: Path, tmp_path: Path) -> None:
    write_hf_parquet(tmp_path / "a.parquet", [png_bytes(p) for p in random_images(2)])
    with pytest.raises(JobError, match="--actors 4") as e:
        score(ckpt, tmp_path / "a.parquet", tmp_path / "out", "big", actors=4, cpus_per_actor=1)
    assert "--cpus-per-actor" in str(e.value) and "2 and the read tasks need 0.5" in str(e.value)
    assert not (tmp_path / "out" / "big" / "_manifest.json").exists()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("actors", [2, None])
def test_fractional_cpus_per_actor_completes(ckpt: Path, tmp_path: Path, actors: int | None) -> None:
    write_hf_parquet(tmp_path / "a.parquet", [png_bytes(p) for p in random_images(12, seed=10)], row_group_size=3)
    r = score(ckpt, tmp_path / "a.parquet", tmp_path / "out", "frac", actors=actors, cpus_per_actor=0.5)
    assert r.status == "complete"
    assert r.manifest["rows"] == {"in": 12, "ok": 12, "error": 0}
    assert r.manifest["options"]["cpus_per_actor"] == 0.5


@pytest.mark.parametrize(("kw", "text"), [
    ({"run_id": "a/b"}, "must not contain '/'"),
    ({"run_id": "_x"}, "must not contain '/' or start with"),
    ({"run_id": " x"}, "--run-id ' x' is not a run id"),
    ({"run_id": "x" * 300}, "--run-id 'x+'... is 300 characters long; expected at most 128"),
    ({"batch_size": 0}, "--batch-size must be >= 1"),
])
def test_bad_options_are_job_errors(ckpt: Path, tmp_path: Path, kw: dict[str, Any], text: str) -> None:
    opts = {"run_id": "ok", "batch_size": 8} | kw
    with pytest.raises(JobError, match=text):
        run_score(ScoreOptions(str(ckpt), str(tmp_path), str(tmp_path / "out"), **opts), echo=lambda _m: None)
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint_and_missing_input_are_job_errors(ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(JobError, match=f"checkpoint '{tmp_path / 'nope'}' has no config.json"):
        score(tmp_path / "nope", tmp_path, tmp_path / "out", "x")
    with pytest.raises(JobError, match="does not exist"):
        score(ckpt, tmp_path / "missing-input", tmp_path / "out", "x")
    assert not os.path.exists(tmp_path / "out" / "x")


# ---------------------------------------------------------------------------- commit race
def test_losing_the_commit_race_discards_this_attempt(ckpt: Path, tmp_path: Path) -> None:
    """Another writer commits the same run id while this run is scoring: exit 4, its attempt is deleted."""
    from jobs import manifest
    from jobs.storage import Store

    out = tmp_path / "out"
    write_hf_parquet(tmp_path / "a.parquet", [png_bytes(p) for p in random_images(3, seed=11)])

    def commit_first(_msg: str) -> None:  # echo is called once the plan is made, before any scoring
        listed = manifest.write_list(Store(), str(out / "race" / "attempt-w" / "_outputs.parquet"), [],
                                     manifest.OUTPUT_SCHEMA)
        manifest.commit(Store(), str(out), "race", {"status": "complete", "winner": True, "outputs": listed})

    r = run_score(ScoreOptions(str(ckpt), str(tmp_path / "a.parquet"), str(out), run_id="race", batch_size=8),
                  echo=commit_first)
    assert (r.status, r.exit_code) == ("lost-commit-race", 4)
    assert r.manifest["rows"]["in"] == 3
    assert read_manifest(out, "race")["winner"] is True
    assert tree(out / "race") == {"_manifest.json", "attempt-w", "attempt-w/_outputs.parquet"}


# ---------------------------------------------------------------------------- bugs
def test_null_id_is_not_the_string_none(ckpt: Path, tmp_path: Path) -> None:
    px = random_images(3, seed=12)
    pq.write_table(pa.table({"id": ["k0", None, "k2"], "image": [png_bytes(p) for p in px]}), tmp_path / "n.parquet")
    r = score(ckpt, tmp_path / "n.parquet", tmp_path / "out", "nullid")
    ids = read_outputs(r.manifest)["id"].to_pylist()
    assert ids[0] == "k0" and ids[2] == "k2"
    assert ids[1] in (None, f"{tmp_path / 'n.parquet'}#1"), f"id of a null-id row is {ids[1]!r}"


def test_unlabelled_input_still_has_the_contract_columns(ckpt: Path, tmp_path: Path) -> None:
    pq.write_table(pa.table({"image": pa.array([png_bytes(p) for p in random_images(2, seed=13)], pa.binary())}),
                   tmp_path / "u.parquet")
    r = score(ckpt, tmp_path / "u.parquet", tmp_path / "out", "unlabelled")
    t = read_outputs(r.manifest)
    assert t.column_names == CONTRACT
    assert t["label"].to_pylist() == [None, None]


def test_manifest_output_uris_are_absolute_for_a_relative_output(ckpt: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    write_hf_parquet(tmp_path / "a.parquet", [png_bytes(p) for p in random_images(2, seed=14)])
    monkeypatch.chdir(tmp_path)
    r = score(ckpt, "a.parquet", "out", "rel")
    assert r.status == "complete"
    assert outputs_of(r.manifest) and all(os.path.isabs(o["uri"]) for o in outputs_of(r.manifest)), outputs_of(r.manifest)


def test_a_non_integer_label_column_makes_the_file_a_failed_input(ckpt: Path, tmp_path: Path) -> None:
    px = random_images(2, seed=15)
    pq.write_table(pa.table({"image": [png_bytes(p) for p in px], "caption": ["cat", "dog"]}), tmp_path / "c.parquet")
    with pytest.raises(JobError, match="label column 'caption' has type string; expected integer class ids"):
        score(ckpt, tmp_path / "c.parquet", tmp_path / "out", "strlabel", label_column="caption")


# ---------------------------------------------------------------------------- resume
def test_resume_keeps_the_complete_files_of_an_earlier_attempt_and_lists_every_row_once(
        ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from jobs import parts, pipeline

    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    for i, name in enumerate("abc"):
        write_hf_parquet(inp / f"{name}.parquet", [png_bytes(p) for p in random_images(30, seed=70 + i)],
                         row_group_size=10)
    opts = {"batch_size": 10, "rows_per_file": 10}

    def driver_dies(*_a: object, **_k: object) -> None:  # every part is written, the commit never happens
        raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(pipeline.Run, "commit", driver_dies)
        with pytest.raises(pipeline.Interrupted, match="--resume r"):
            score(ckpt, inp, out, "r", **opts)
    (first,) = parts.attempts(Store(), str(out / "r"))
    _, written = parts.scan_attempt(Store(), first)
    assert sum(p["rows"] for p in written) == 90 and all(len(p["sources"]) == 1 for p in written)
    os.unlink(next(p["uri"] for p in written if str(inp / "c.parquet") in p["sources"]))  # c is incomplete

    r = score(ckpt, inp, out, "r", resume="r", **opts)
    assert (r.status, r.manifest["rows"], r.manifest["resumed_rows"]) == ("complete", {"in": 90, "ok": 90, "error": 0}, 60)
    listed = outputs_of(r.manifest)
    assert sum(o["rows"] for o in listed if o["uri"].startswith(first + "/")) == 60
    t = read_outputs(r.manifest)
    assert t["id"].to_pylist() == [f"{inp / n}.parquet#{j}" for n in "abc" for j in range(30)]  # each row once
    fresh = read_outputs(score(ckpt, inp, tmp_path / "fresh", "f", **opts).manifest)
    np.testing.assert_allclose(t["latent_loglik"].to_numpy(), fresh["latent_loglik"].to_numpy(), rtol=1e-6)


def test_resume_of_a_run_that_never_started_is_an_error(ckpt: Path, tmp_path: Path) -> None:
    write_hf_parquet(tmp_path / "a.parquet", [png_bytes(p) for p in random_images(2)])
    with pytest.raises(JobError, match=f"--resume nope: no earlier attempt of that run under {tmp_path / 'out'}"):
        score(ckpt, tmp_path / "a.parquet", tmp_path / "out", None, resume="nope")  # type: ignore[arg-type]


def test_output_files_are_sized_by_rows_not_one_per_block(ckpt: Path, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    for i in range(5):  # 5 files x 19 rows, scored in batches of 8: 12 blocks reach the writer
        write_hf_parquet(tmp_path / "in" / f"s{i}.parquet", [png_bytes(p) for p in random_images(19, seed=90 + i)],
                         row_group_size=7)
    r = score(ckpt, tmp_path / "in", tmp_path / "out", "sized", rows_per_file=40)
    listed = outputs_of(r.manifest)
    assert sorted(o["rows"] for o in listed) == [15, 40, 40]
    assert [pq.read_metadata(o["uri"]).num_rows for o in listed] == [o["rows"] for o in listed]
    assert sum(o["ok"] for o in listed) == r.manifest["rows"]["ok"] == 95


# ---------------------------------------------------------------------------- columns on demand
def test_columns_on_demand_make_only_those_plus_pred_and_the_threshold_score(ckpt: Path, tmp_path: Path) -> None:
    pixels = random_images(12, seed=41)
    write_hf_parquet(tmp_path / "a.parquet", [png_bytes(p) for p in pixels])
    r = score(ckpt, tmp_path / "a.parquet", tmp_path / "out", "cols", columns=("max_softmax", "energy"))
    th = nrm.load(ckpt).config.fitted.threshold
    assert th is not None and th.score == "latent_loglik"
    assert r.manifest["columns"] == ["pred", "max_softmax", "energy", "latent_loglik"]
    t = read_outputs(r.manifest)
    assert t.column_names == ["id", "source_path", "source_row", "label", "status", "error", "pred", "max_softmax",
                              "energy", "latent_loglik", "ood_score", "is_ood", "model_id"]
    ref = reference_scores(ckpt, pixels)
    np.testing.assert_allclose(t["energy"].to_numpy(), ref["energy"], rtol=1e-5)


def test_a_column_the_model_does_not_make_fails_the_run_naming_it(ckpt: Path, tmp_path: Path) -> None:
    write_hf_parquet(tmp_path / "a.parquet", [png_bytes(p) for p in random_images(2)])
    with pytest.raises(JobError, match="--columns det_gmm: not a column of this model"):
        score(ckpt, tmp_path / "a.parquet", tmp_path / "out", "bad", columns=("det_gmm",))
    assert not (tmp_path / "out" / "bad").exists()


def test_a_run_in_bf16_records_its_precision_and_keeps_most_predictions(ckpt: Path, tmp_path: Path) -> None:
    pixels = random_images(16, seed=43)
    write_hf_parquet(tmp_path / "a.parquet", [png_bytes(p) for p in pixels])
    r = score(ckpt, tmp_path / "a.parquet", tmp_path / "out", "bf16", precision="bf16")
    assert r.manifest["precision"] == "bf16" and r.manifest["rows"]["ok"] == 16
    pred = read_outputs(r.manifest)["pred"].to_numpy()
    assert (pred == reference_scores(ckpt, pixels)["pred"]).mean() >= 0.75


def test_a_compiled_run_records_it_and_scores_as_the_eager_model(ckpt: Path, tmp_path: Path) -> None:
    """--compile with forward-only columns (a gate-statistics detector as the threshold score): the
    actors' compiled pass gives the eager model's scores, and the manifest says it was compiled."""
    import torch

    from nrm.fit import refit

    model = nrm.load(ckpt)
    refit(model, [torch.randn(64, *model.input_shape, generator=torch.Generator().manual_seed(0))])
    nrm.save(model, tmp_path / "gates")  # threshold det_mahalanobis on gates_acts: no backward pass
    pixels = random_images(16, seed=44)
    write_hf_parquet(tmp_path / "a.parquet", [png_bytes(p) for p in pixels])
    r = score(tmp_path / "gates", tmp_path / "a.parquet", tmp_path / "out", "compiled", columns=("energy",), compile=True)
    assert r.manifest["compiled"] is True and r.manifest["columns"] == ["pred", "energy", "det_mahalanobis"]
    t = read_outputs(r.manifest)
    eager = nrm.load(tmp_path / "gates").score(model.preprocess(torch.from_numpy(pixels)), columns=["energy", "det_mahalanobis"])
    np.testing.assert_allclose(t["energy"].to_numpy(), eager["energy"].numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(t["det_mahalanobis"].to_numpy(), eager["det_mahalanobis"].numpy(), rtol=1e-3, atol=1e-3)


def test_a_compiled_run_of_the_full_table_scores_as_the_eager_model(ckpt: Path, tmp_path: Path) -> None:
    """--compile with the default columns: the actors compile the full pass (forward and top-down walk
    as one graph), and its rendered columns equal the eager model's."""
    pixels = random_images(16, seed=45)
    write_hf_parquet(tmp_path / "a.parquet", [png_bytes(p) for p in pixels])
    r = score(ckpt, tmp_path / "a.parquet", tmp_path / "out", "compiled-full", compile=True)
    assert r.manifest["compiled"] is True and r.manifest["rows"]["ok"] == 16
    t = read_outputs(r.manifest)
    model = nrm.load(ckpt)
    eager = model.score(model.preprocess(torch.from_numpy(pixels)))
    for c in ("latent_prior", "recon_sq_error", "loglik_bound"):
        np.testing.assert_allclose(t[c].to_numpy(), eager[c].numpy(), rtol=1e-4, atol=1e-4 * float(eager[c].abs().max()))
