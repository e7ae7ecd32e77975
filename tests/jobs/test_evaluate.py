"""`nrm-ood evaluate`: the metrics tables on sets with known answers, renderings, the written report,
and the command end to end on the session's embedded Ray (tiny 8x8 sets, tiny checkpoint)."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from support import make_checkpoint, png_bytes, random_images, write_hf_parquet
from typer.testing import CliRunner

import nrm
from jobs import figures as F
from jobs.cli import app
from jobs.evaluate import (
    EvalResult,
    ScoredSet,
    accuracy,
    error_reasons,
    group_sets,
    metrics_markdown,
    metrics_table,
    parse_ood,
    score_columns,
    summary,
    write_evaluation,
)
from jobs.images import Policy
from jobs.parts import ADAPT_COLUMN
from jobs.pipeline import Checkpoint, ReadSpec, Scorer, read_unit
from jobs.planning import plan_inputs
from jobs.storage import Store
from nrm.fit import refit

runner = CliRunner(env={"COLUMNS": "200"})
LAYERS = ["conv1", "conv2"]  # latent layers of support.tiny_config


def score_file(ckpt: Path, path: Path) -> pa.Table:
    """The pipeline's output rows for ``path``, computed in-process by its own read and score stages."""
    store = Store()
    ck = Checkpoint.fetch(store, str(ckpt))
    plan = plan_inputs(store, store.list_parquet(str(path)), None, None, None)
    spec = ReadSpec(store, (1, 8, 8), Policy.adapt)
    scorer = Scorer(ck, 1)
    # the write task drops the internal ADAPT_COLUMN before a part is written
    return pa.concat_tables([scorer(read_unit(u, spec)).drop_columns([ADAPT_COLUMN]) for u in plan.units])


def synthetic(n: int, base: float, ok_rows: int | None = None, flip: float = 1.0) -> pa.Table:
    """A scores table whose every score separates by ``base``; max_softmax runs the other way."""
    v = base + np.arange(n, dtype=np.float64) / n  # in [base, base + 1)
    status = ["ok"] * n if ok_rows is None else ["ok"] * ok_rows + ["error"] * (n - ok_rows)
    ok = np.array([s == "ok" for s in status])
    mask = ~ok
    layers = np.stack([v, np.full(n, 0.25)], axis=1)  # conv1 separates, conv2 is identical everywhere
    return pa.table({
        "id": [f"r{i}" for i in range(n)],
        "source_path": ["x.parquet"] * n,
        "source_row": pa.array(np.arange(n), pa.int64()),
        "status": status,
        "error": [None if k else "cannot decode image" for k in ok],
        "pred": pa.array(np.zeros(n, dtype=np.int64), mask=mask),
        "latent_loglik": pa.array(v, mask=mask),
        "latent_prior": pa.array(v, mask=mask),
        "recon_sq_error": pa.array(-v, mask=mask),  # lower error = in-distribution
        "loglik_bound": pa.array(v, mask=mask),
        "max_softmax": pa.array(flip * -v, mask=mask),  # deliberately backwards
        "max_logit": pa.array(v, mask=mask),
        "energy": pa.array(-v, mask=mask),  # lower energy = in-distribution
        "det_knn": pa.array(v, mask=mask),
        "latent_prior_layers": pa.FixedSizeListArray.from_arrays(pa.array(layers.ravel()), 2, mask=pa.array(mask)),
        "ood_score": pa.array(-v, mask=mask),
        "is_ood": pa.array(v < base + 0.5, mask=mask),
    })


# ---------------------------------------------------------------------------- pure helpers
def test_parse_ood_accepts_name_uri_pairs_and_names_bad_ones() -> None:
    assert parse_ood(["svhn=s3://b/svhn/", "noise = /tmp/n.parquet"]) == {"svhn": "s3://b/svhn/",
                                                                          "noise": "/tmp/n.parquet"}
    for bad, says in [("svhn", "NAME=URI"), ("=x", "NAME=URI"), ("a/b=x", "letters"), ("in=x", "reserved"),
                      (".x=y", "letters")]:
        with pytest.raises(ValueError, match=says):
            parse_ood([bad])
    with pytest.raises(ValueError, match="twice"):
        parse_ood(["a=x", "a=y"])


def test_group_sets_orders_near_far_then_ungrouped_and_refuses_a_name_in_two_options() -> None:
    sets, groups = group_sets({"u": "/u"}, {"a": "/a", "b": "/b"}, {"c": "/c"})
    assert list(sets.items()) == [("a", "/a"), ("b", "/b"), ("c", "/c"), ("u", "/u")]
    assert groups == {"near": ["a", "b"], "far": ["c"]}
    assert group_sets({"u": "/u"}, {}, {}) == ({"u": "/u"}, {})
    with pytest.raises(ValueError, match=r"--far a=/x: NAME 'a' is also given to --near"):
        group_sets({}, {"a": "/a"}, {"a": "/x"})


def test_score_columns_name_layers_and_keep_ok_rows_only() -> None:
    cols = score_columns(synthetic(10, 0.0, ok_rows=7), LAYERS)
    assert list(cols) == ["latent_loglik", "latent_prior", "latent_prior_conv1", "latent_prior_conv2", "recon_sq_error",
                          "loglik_bound", "max_softmax", "max_logit", "energy", "det_knn"]
    assert {n for n, (up, _) in cols.items() if not up} == {"recon_sq_error", "energy"}
    assert all(v.shape == (7,) and np.isfinite(v).all() for _, v in cols.values())
    np.testing.assert_allclose(cols["latent_prior_conv1"][1], np.arange(7) / 10)


def test_metrics_table_on_separated_sets_is_perfect_in_the_right_direction() -> None:
    ind, far = synthetic(40, 10.0), synthetic(30, 0.0, ok_rows=25)
    m = metrics_table(ind, {"far": far}, LAYERS)
    used = {s["name"]: s["used_as"] for s in m["scores"]}
    assert used["energy"].startswith("-score") and used["recon_sq_error"].startswith("-score")
    assert used["latent_loglik"].startswith("score") and used["det_knn"].startswith("score")
    r = m["metrics"]["far"]
    # flipped scores (energy, recon_sq_error) separate perfectly once oriented; so does a det_ column
    for score in ("latent_loglik", "latent_prior", "latent_prior_conv1", "recon_sq_error", "loglik_bound", "max_logit",
                  "energy", "det_knn"):
        assert r[score] == pytest.approx({"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0,
                                          "detection_error": 0.0}), score
    assert r["max_softmax"]["auroc"] == 0.0 and r["max_softmax"]["fpr95"] == 1.0  # used as given: backwards
    assert r["latent_prior_conv2"]["auroc"] == 0.5  # all tied
    assert r["latent_prior_conv2"]["detection_error"] == 0.5


def test_metrics_table_gives_none_when_a_set_has_no_ok_rows() -> None:
    m = metrics_table(synthetic(5, 1.0), {"broken": synthetic(4, 0.0, ok_rows=0)}, LAYERS)
    assert all(v is None for v in m["metrics"]["broken"].values())


def test_accuracy_and_error_reasons() -> None:
    t = synthetic(6, 0.0, ok_rows=4).append_column("label", pa.array([0, 1, None, 0, 0, 0], pa.int64()))
    assert accuracy(t) == {"accuracy": pytest.approx(2 / 3), "labelled_rows": 3}
    assert accuracy(synthetic(3, 0.0)) is None
    assert error_reasons(t) == [{"reason": "cannot decode image", "rows": 2, "example": "cannot decode image"}]
    alike = pa.table({"status": ["error"] * 3 + ["ok"], "error": [
        "cannot decode image (4 bytes): UnidentifiedImageError: cannot identify image file <_io.BytesIO object at 0x7f1>",
        "cannot decode image (12 bytes): UnidentifiedImageError: cannot identify image file <_io.BytesIO object at 0xa2>",
        "empty image (no bytes)", None]})
    assert [(r["reason"], r["rows"]) for r in error_reasons(alike)] == [
        ("cannot decode image (N bytes): UnidentifiedImageError: cannot identify image file <_io.BytesIO object at 0x…>", 2),
        ("empty image (no bytes)", 1)]


def test_metrics_markdown_states_the_conventions() -> None:
    from jobs.evaluate import CONVENTION

    m = metrics_table(synthetic(20, 5.0), {"far": synthetic(20, 0.0)}, LAYERS)
    m |= {"convention": CONVENTION, "model": {"uri": "ck", "model_id": "ab" * 32}, "threshold": None,
          "accuracy": None, "sets": {}}
    md = metrics_markdown(m)
    assert "In-distribution = positive" in md and "keeps 95% of the in-distribution" in md and "OpenOOD" in md
    assert re.search(r"\| energy \| -score \(higher = OOD\) \| 1\.0000 \|", md)
    assert "| latent_prior_conv2 |" in md and "| det_knn |" in md


def test_limited_copy_takes_the_first_rows_in_file_order_and_lists_unreadable_files(tmp_path: Path) -> None:
    from jobs.evaluate import limited_copy

    write_hf_parquet(tmp_path / "a.parquet", [png_bytes(p) for p in random_images(5)], labels=[1] * 5, row_group_size=2)
    (tmp_path / "b.parquet").write_bytes(b"PAR1 truncated")
    write_hf_parquet(tmp_path / "c.parquet", [png_bytes(p) for p in random_images(5)], labels=[2] * 5)
    rec = limited_copy(Store(), str(tmp_path), 7, tmp_path / "out" / "x.parquet")
    assert pq.read_table(tmp_path / "out" / "x.parquet")["label"].to_pylist() == [1] * 5 + [2] * 2
    assert rec["rows"] == 7 and rec["files"] == [str(tmp_path / "a.parquet"), str(tmp_path / "c.parquet")]
    assert [f["uri"] for f in rec["failed_inputs"]] == [str(tmp_path / "b.parquet")]


# ---------------------------------------------------------------------------- renderings and the report
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "m")


def test_render_pairs_rereads_rows_and_renders_them(ckpt: Path, tmp_path: Path) -> None:
    px = random_images(10, seed=3)
    write_hf_parquet(tmp_path / "a.parquet", [png_bytes(p) for p in px], row_group_size=3)
    model = nrm.load(ckpt)
    refs = [(str(tmp_path / "a.parquet"), r) for r in (7, 0, 4)] + [(str(tmp_path / "gone.parquet"), 0)]
    imgs, renders, errors = F.render_pairs(Store(), model, refs)
    assert errors[:3] == [None] * 3 and "gone.parquet" in str(errors[3])
    np.testing.assert_array_equal(imgs[:3], px[[7, 0, 4]])
    h0 = model.render(model.preprocess(torch.from_numpy(px[[7, 0, 4]]))).h0  # (3, 1, 8, 8)
    v = (h0 * 0.25 + 0.5).double().permute(0, 2, 3, 1).numpy()
    lo, hi = v.min(axis=(1, 2, 3), keepdims=True), v.max(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(renders[:3], (v - lo) / (hi - lo), atol=1e-6)
    assert renders[:3].min() == 0.0 and renders[:3].max() == 1.0
    assert not imgs[3].any() and not renders[3].any()


def scored_sets(ckpt: Path, root: Path) -> list[ScoredSet]:
    """In-distribution (labelled, one corrupt row) and one OOD set, scored in-process."""
    root.mkdir(parents=True, exist_ok=True)
    ind = [png_bytes(p) for p in random_images(20, seed=1)]
    ind[3] = b"not a png"
    write_hf_parquet(root / "in.parquet", ind, labels=[i % 3 for i in range(20)], row_group_size=8)
    write_hf_parquet(root / "ood.parquet", [png_bytes(p) for p in np.full((12, 8, 8, 1), 255, np.uint8)])
    sets = []
    for name in ("in", "flat"):
        path = root / ("in.parquet" if name == "in" else "ood.parquet")
        sets.append(ScoredSet(name, name, str(path), score_file(ckpt, path),
                              {"input": str(path), "threshold": None, "options": {"resize_policy": "adapt"}}))
    return sets


def test_write_evaluation_writes_metrics_figures_and_image_rendering_galleries(ckpt: Path, tmp_path: Path) -> None:
    model = nrm.load(ckpt)
    sets = scored_sets(ckpt, tmp_path / "data")
    out = tmp_path / "eval"
    det = {"name": "mahalanobis", "features": "gates", "selection": {"det_mahalanobis_gates": {"flat": 0.5}}}
    m = write_evaluation(sets, model, out, {"uri": str(ckpt), "model_id": "x", "detector": det})
    saved = json.loads((out / "metrics.json").read_text())
    md = (out / "metrics.md").read_text()
    assert saved["model"]["detector"] == det
    assert "`det_mahalanobis` is the checkpoint's fitted detector: mahalanobis on the NRM features `gates`" in md
    assert "\n- det_mahalanobis_gates: flat 0.500\n" in md
    assert saved["sets"]["in"] == m["sets"]["in"]
    assert (saved["sets"]["in"]["rows"], saved["sets"]["in"]["ok"], saved["sets"]["in"]["error"]) == (20, 19, 1)
    assert saved["sets"]["in"]["error_reasons"][0]["rows"] == 1
    assert saved["accuracy"]["labelled_rows"] == 19
    assert set(saved["metrics"]) == {"flat"}
    assert {s["name"] for s in saved["scores"]} >= {"latent_prior_conv1", "latent_prior_conv2", "energy"}
    assert "## flat" in (out / "metrics.md").read_text()
    html = (out / "report.html").read_text()
    srcs = re.findall(r'<img src="([^"]+)"', html)  # self-contained: every figure embedded, also saved beside it
    assert len(srcs) == sum(map(len, saved["figures"].values())) and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r'(src|href)="(?!data:)', html)
    assert all((out / f).is_file() for fs in saved["figures"].values() for f in fs)
    assert len(saved["figures"]["roc"]) == 1 and len(saved["figures"]["layers"]) == 1
    # galleries: most and least OOD of each set, each image over its rendering
    assert sorted(saved["figures"]["gallery"]) == sorted(f"figures/gallery-{s}-{k}.png" for s in ("in", "flat")
                                                         for k in ("most", "least"))
    most = saved["galleries"]["in"]["most"]
    assert len(most) == 8 and all(g["error"] is None for g in most)
    scores = [g["ood_score"] for g in most]
    assert scores == sorted(scores, reverse=True)
    ok = sets[0].table.filter(pa.compute.equal(sets[0].table["status"], "ok"))
    assert scores[0] == pytest.approx(max(ok["ood_score"].to_pylist()))
    two_rows = Image.open(out / "figures" / "gallery-in-most.png").size
    one_row = Image.open(__import__("io").BytesIO(F.gallery("t", np.zeros((8, 8, 8, 1), np.uint8), None, ["c"] * 8))).size
    assert two_rows[1] > 1.5 * one_row[1] - 20  # a second row of renderings under the images


def test_group_means_go_to_metrics_files_report_and_screen(ckpt: Path, tmp_path: Path) -> None:
    ind, flat = scored_sets(ckpt, tmp_path / "data")
    extra = {}
    for name, px in (("noise", random_images(12, seed=9)), ("black", np.zeros((12, 8, 8, 1), np.uint8))):
        path = tmp_path / "data" / f"{name}.parquet"
        write_hf_parquet(path, [png_bytes(p) for p in px])
        extra[name] = ScoredSet(name, name, str(path), score_file(ckpt, path), {"input": str(path)})
    sets = [ind, replace(flat, group="near"), replace(extra["noise"], group="near"), replace(extra["black"], group="far")]
    m = write_evaluation(sets, nrm.load(ckpt), tmp_path / "eval", {"uri": str(ckpt), "model_id": "x"})
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert {g: v["sets"] for g, v in saved["groups"].items()} == {"near": ["flat", "noise"], "far": ["black"]}
    per = saved["metrics"]
    for sc in (s["name"] for s in saved["scores"]):
        for k in ("auroc", "fpr95"):
            assert saved["groups"]["near"][k][sc] == pytest.approx((per["flat"][sc][k] + per["noise"][sc][k]) / 2)
            assert saved["groups"]["far"][k][sc] == per["black"][sc][k]
    energy = [f"{saved['groups'][g][k]['energy']:.4f}" for g in ("near", "far") for k in ("auroc", "fpr95")]
    md = (tmp_path / "eval" / "metrics.md").read_text()
    assert "## Near / far OOD group means" in md and "near: flat, noise; far: black" in md
    assert "| energy | -score (higher = OOD) | " + " | ".join(energy) + " |" in md
    assert "when 95% of in-distribution samples are accepted" in md
    html = (tmp_path / "eval" / "report.html").read_text()
    assert "Near / far OOD group means" in html and "near FPR@95TPR" in html
    screen = summary(EvalResult(tmp_path / "eval", m, []))
    assert re.search(r"score +near AUROC +near FPR@95TPR +far AUROC +far FPR@95TPR\n", screen)
    assert re.search(r"^energy +" + " +".join(energy) + "$", screen, re.M)


# ---------------------------------------------------------------------------- the command, on Ray
@pytest.mark.ray
@pytest.mark.usefixtures("ray_local")
def test_evaluate_command_end_to_end_reuses_runs_and_checks_them(ckpt: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "in").mkdir(parents=True)
    (data / "noise").mkdir()
    write_hf_parquet(data / "in" / "a.parquet", [png_bytes(p) for p in random_images(40, seed=1)],
                     labels=[i % 3 for i in range(40)], row_group_size=16)
    write_hf_parquet(data / "in" / "b.parquet", [png_bytes(p) for p in random_images(30, seed=2)],
                     labels=[0] * 30, row_group_size=16)
    noise = [png_bytes(p) for p in random_images(30, seed=3)]
    noise[4] = None
    write_hf_parquet(data / "noise" / "n.parquet", noise)
    out = tmp_path / "eval"
    args = ["evaluate", "--model", str(ckpt), "--in", str(data / "in"), "--ood", f"noise={data / 'noise'}",
            "--out", str(out), "--limit", "60", "--batch-size", "16"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "AUROC" in r.output
    m = json.loads((out / "metrics.json").read_text())
    assert {k: (v["rows"], v["ok"], v["error"]) for k, v in m["sets"].items()} == {"in": (60, 60, 0),
                                                                                   "noise": (30, 29, 1)}
    assert m["sets"]["noise"]["error_reasons"] == [{"reason": "empty image (no bytes)", "rows": 1,
                                                    "example": "empty image (no bytes)"}]
    assert m["accuracy"]["labelled_rows"] == 60
    # the first 60 rows: all of a.parquet, then the first 20 of b.parquet
    limited = pq.read_table(out / "inputs" / "in.parquet")
    assert limited["label"].to_pylist() == [i % 3 for i in range(40)] + [0] * 20
    assert json.loads((out / "inputs" / "in.json").read_text())["files"] == [str(data / "in" / "a.parquet"),
                                                                            str(data / "in" / "b.parquet")]
    for rid in ("in", "ood-noise"):
        assert (out / "scores" / rid / "_manifest.json").is_file()
    for f in ("metrics.md", "report.html", "figures/gallery-noise-most.png", "figures/auroc-by-layer.png"):
        assert (out / f).is_file(), f
    assert set(m["metrics"]["noise"]) == {s["name"] for s in m["scores"]}

    again = runner.invoke(app, args)  # committed runs are reused, nothing is scored again
    assert again.exit_code == 0, again.output
    assert again.output.count("reusing committed run") == 2

    other = runner.invoke(app, [*args[:-4], "--limit", "10", "--batch-size", "16"])
    assert other.exit_code == 1
    assert other.stderr.startswith("error: ") and "first 10 rows" in other.stderr and "fresh --out" in other.stderr

    # same weights (same model_id), refitted state: the committed scores are stale and are not reused
    model = nrm.load(ckpt)
    refit(model, [model.preprocess(torch.from_numpy(random_images(60, seed=9)))])
    nrm.save(model, tmp_path / "refit")
    stale = runner.invoke(app, ["evaluate", "--model", str(tmp_path / "refit"), *args[3:]])
    assert stale.exit_code == 1 and "same weights" in stale.stderr and "different config.json" in stale.stderr


def test_evaluate_command_rejects_bad_ood_and_missing_checkpoint(tmp_path: Path) -> None:
    r = runner.invoke(app, ["evaluate", "--model", "m", "--in", "x", "--ood", "noise", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "NAME=URI" in r.output
    r = runner.invoke(app, ["evaluate", "--model", str(tmp_path / "nope"), "--in", "x", "--ood", "n=y",
                            "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and r.stderr.startswith("error: ") and "nope" in r.stderr



def test_the_threshold_score_comes_first_and_marked_in_every_table(ckpt: Path, tmp_path: Path) -> None:
    sets = scored_sets(ckpt, tmp_path / "data")
    sets[0].manifest["threshold"] = {"score": "energy", "value": -1.5, "tpr": 0.95}
    out = tmp_path / "eval"
    m = write_evaluation(sets, nrm.load(ckpt), out, {"uri": str(ckpt), "model_id": "x"})
    assert [(sc["name"], sc["default"]) for sc in m["scores"][:2]] == [("energy", True), ("latent_loglik", False)]
    assert sum(sc["default"] for sc in m["scores"]) == 1
    md = (out / "metrics.md").read_text()
    auroc = md.split("## AUROC by score and OOD set")[1].splitlines()
    assert auroc[4].startswith("| energy (default: decides is_ood) | -score (higher = OOD) | ")
    html = (out / "report.html").read_text()
    assert "<tbody><tr><td>energy (default: decides is_ood)</td>" in html
    text = summary(EvalResult(out, m, []))
    header = next(line for line in text.splitlines() if line.startswith("OOD set"))
    assert header.split()[2] == "energy*"
    assert "* decides is_ood: flagged when energy < -1.5 (the checkpoint's threshold)" in text


def test_histogram_view_keeps_the_bulk_and_the_threshold_visible_under_a_heavy_tail() -> None:
    bulk = np.linspace(400.0, 600.0, 990)
    tail = np.linspace(1e4, 1e5, 10)  # 1% of the values, up to 100,000
    v = F.view(np.concatenate([bulk, tail]), threshold=516.0)
    assert 390 < v.lo < 400 and 600 < v.hi < 1000 and v.linthresh is None  # the 1st-99th percentiles
    v = F.view(np.concatenate([bulk, tail]), threshold=-50.0)
    assert v.lo < -50 and v.hi < 1000  # widened to the threshold
    v = F.view(bulk)  # no heavy tail: the full range
    assert v.lo < 400 < 600 < v.hi < 610 and v.linthresh is None


def test_histogram_view_is_symlog_over_many_decades_of_one_sign() -> None:
    v = F.view(np.concatenate([np.linspace(-3e6, -1e6, 500), np.linspace(-8e7, -1e7, 500)]), threshold=-3.3e6)
    assert (v.lo, v.hi, v.linthresh) == (-8e7, -1e6, 1e6)
    edges = v.bins(4)  # equal widths in log10(1 + |x| / 1e6): the middle edge at 1e6 (sqrt(81 * 2) - 1)
    assert edges[0] == pytest.approx(-8e7) and edges[-1] == pytest.approx(-1e6)
    assert np.all(np.diff(edges) > 0) and edges[2] == pytest.approx(-1e6 * (np.sqrt(81 * 2) - 1))


def test_gallery_captions_show_the_true_label_when_there_is_one() -> None:
    row = {"ood_score": 1.234, "pred": 1, "label": 0}
    assert F.caption(row, ["cat", "dog"]) == "1.23\npred dog\nlabel cat"
    assert F.caption({"ood_score": 2.0, "pred": 1, "label": None}, None, "gone") == "2 (unreadable)\npred 1"


@pytest.mark.ray
@pytest.mark.usefixtures("ray_local")
def test_evaluate_command_reports_near_and_far_group_means(ckpt: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    write_hf_parquet(data / "in.parquet", [png_bytes(p) for p in random_images(24, seed=1)], labels=[0] * 24)
    write_hf_parquet(data / "noise.parquet", [png_bytes(p) for p in random_images(16, seed=3)])
    write_hf_parquet(data / "flat.parquet", [png_bytes(p) for p in np.full((16, 8, 8, 1), 255, np.uint8)])
    write_hf_parquet(data / "black.parquet", [png_bytes(p) for p in np.zeros((16, 8, 8, 1), np.uint8)])
    out = tmp_path / "eval"
    r = runner.invoke(app, ["evaluate", "--model", str(ckpt), "--in", str(data / "in.parquet"),
                            "--near", f"noise={data / 'noise.parquet'}", "--far", f"flat={data / 'flat.parquet'}",
                            "--far", f"black={data / 'black.parquet'}", "--out", str(out), "--batch-size", "16"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert {g: v["sets"] for g, v in m["groups"].items()} == {"near": ["noise"], "far": ["flat", "black"]}
    assert {n: s["group"] for n, s in m["sets"].items()} == {"in": None, "noise": "near", "flat": "far", "black": "far"}
    far = (m["metrics"]["flat"]["energy"]["auroc"] + m["metrics"]["black"]["energy"]["auroc"]) / 2
    assert m["groups"]["far"]["auroc"]["energy"] == pytest.approx(far)
    assert "near: noise; far: flat, black" in r.output
    assert re.search(rf"^energy +{m['groups']['near']['auroc']['energy']:.4f} +[0-9.]+ +{far:.4f} ", r.output, re.M)
    assert "## Near / far OOD group means" in (out / "metrics.md").read_text()


def test_evaluate_command_refuses_a_set_name_in_two_groups(tmp_path: Path) -> None:
    r = runner.invoke(app, ["evaluate", "--model", "m", "--in", "x", "--near", "a=/p", "--far", "a=/q",
                            "--out", str(tmp_path)])
    assert r.exit_code == 2 and "NAME 'a' is also given to --near" in r.output


def test_evaluate_command_needs_an_ood_set(tmp_path: Path) -> None:
    r = runner.invoke(app, ["evaluate", "--model", "m", "--in", "x", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "give at least one OOD set: --near, --far or --ood" in r.output
