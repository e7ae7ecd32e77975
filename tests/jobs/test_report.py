"""`nrm-ood report` on a committed audit run (made in-process by the pipeline's own read and score
stages, no Ray), its pure tables, and one check in headless Chromium that every figure loads."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import asdict
from datetime import datetime, timezone
from html import unescape
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support import make_checkpoint, png_bytes, random_images, write_hf_parquet
from typer.testing import CliRunner

import nrm
from jobs import manifest
from jobs.cli import app
from jobs.evaluate import ScoredSet, write_evaluation
from jobs.images import Policy
from jobs.parts import ADAPT_COLUMN
from jobs.pipeline import Checkpoint, ReadSpec, Scorer, read_unit
from jobs.planning import plan_inputs
from jobs.report import ReportError, ReportOptions, build_report, class_table, locate, newest_rows, rate_table
from jobs.storage import Store

runner = CliRunner(env={"COLUMNS": "200"})
CHROMIUM = Path("/usr/bin/chromium")


def score_file(ck: Checkpoint, path: Path) -> pa.Table:
    """The pipeline's output rows for ``path``, computed in-process by its own read and score stages."""
    store = Store()
    plan = plan_inputs(store, store.list_parquet(str(path)), None, None, None)
    spec = ReadSpec(store, (1, 8, 8), Policy.adapt)
    scorer = Scorer(ck, 1)
    # the write task drops the internal ADAPT_COLUMN before a part is written
    return pa.concat_tables([scorer(read_unit(u, spec)).drop_columns([ADAPT_COLUMN]) for u in plan.units])


@pytest.fixture(scope="module")
def audit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A committed run r1 over data/{a,b}.parquet (b has two corrupt rows), as `nrm-ood score` writes it."""
    root = tmp_path_factory.mktemp("audit")
    ckpt = make_checkpoint(root / "ckpt")
    data = root / "data"
    data.mkdir()
    write_hf_parquet(data / "a.parquet", [png_bytes(p) for p in random_images(14, seed=1)], row_group_size=5)
    b = [png_bytes(p) for p in random_images(8, seed=2)]
    b[1], b[6] = b"junk", None
    write_hf_parquet(data / "b.parquet", b)
    ck = Checkpoint.fetch(Store(), str(ckpt))
    table = pa.concat_tables([score_file(ck, data / "a.parquet"), score_file(ck, data / "b.parquet")])
    out = root / "scores"
    part = out / "r1" / "attempt-0" / "part-0.parquet"
    part.parent.mkdir(parents=True)
    pq.write_table(table, part)
    cfg = nrm.load(ckpt).config
    ok = int(np.sum(np.array(table["status"].to_pylist()) == "ok"))
    manifest.commit(Store(), str(out), "r1", {
        "status": "complete", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"uri": str(ckpt), "model_id": ck.model_id}, "input": str(data),
        "failed_inputs": [], "outputs": manifest.write_list(Store(), str(part.parent / "_outputs.parquet"), [
            {"uri": str(part), "rows": table.num_rows, "ok": ok, "error": table.num_rows - ok, "ood": 0,
             "converted": 0, "resized": 0}], manifest.OUTPUT_SCHEMA),
        "rows": {"in": table.num_rows, "ok": ok, "error": table.num_rows - ok},
        "flagged_ood": int(pa.compute.sum(table["is_ood"]).as_py() or 0),
        "threshold": asdict(cfg.fitted.threshold), "timings": {}, "options": {"resize_policy": "adapt"}})
    return {"root": root, "ckpt": ckpt, "data": data, "scores": out, "table": table, "ck": ck}


# ---------------------------------------------------------------------------- pure tables
def test_rate_and_class_tables_count_ok_rows_and_flags() -> None:
    t = pa.table({"source_path": ["a", "a", "a", "b", "b"], "status": ["ok", "ok", "error", "ok", "ok"],
                  "pred": pa.array([0, 1, None, 1, 1], pa.int64()), "is_ood": pa.array([True, False, None, True, True])})
    assert rate_table(t, "source_path") == [
        {"source_path": "a", "rows": 3, "ok": 2, "error": 1, "flagged_ood": 1, "ood_rate": 0.5},
        {"source_path": "b", "rows": 2, "ok": 2, "error": 0, "flagged_ood": 2, "ood_rate": 1.0}]
    by_class = class_table(t, ["cat", "dog"])
    assert [(r["class"], r["ok"], r["flagged_ood"], r["ood_rate"]) for r in by_class] == [
        ("cat", 1, 1, 1.0), ("dog", 3, 2, pytest.approx(2 / 3))]


def test_locate_maps_scored_paths_into_a_moved_input() -> None:
    where = locate(["/old/data/x/a.parquet", "/old/data/b.parquet", "/elsewhere/c.parquet"],
                   ["/new/x/a.parquet", "/new/b.parquet", "/new/c.parquet", "/new/y/c.parquet"], "/old/data")
    assert where == {"/old/data/x/a.parquet": "/new/x/a.parquet", "/old/data/b.parquet": "/new/b.parquet",
                     "/elsewhere/c.parquet": None}  # ambiguous by name: not guessed


# ---------------------------------------------------------------------------- the report
def test_report_without_input_has_tables_threshold_and_no_external_resources(audit: dict[str, Any],
                                                                             tmp_path: Path) -> None:
    rep = build_report(ReportOptions(str(audit["scores"] / "r1"), tmp_path), echo=lambda _: None)
    t: pa.Table = audit["table"]
    assert rep["rows"] == {"in": 22, "ok": 20, "error": 2, "flagged_ood": int(pa.compute.sum(t["is_ood"]).as_py())}
    assert rep["ood_score_threshold"] == -rep["threshold"]["value"]
    assert sum(r["ok"] for r in rep["by_class"]) == 20
    assert sum(r["flagged_ood"] for r in rep["by_class"]) == rep["rows"]["flagged_ood"]
    assert {r["source_path"]: (r["rows"], r["error"]) for r in rep["by_file"]} == {
        str(audit["data"] / "a.parquet"): (14, 0), str(audit["data"] / "b.parquet"): (8, 2)}
    assert sorted((e["reason"].split(" (")[0], e["rows"]) for e in rep["errors"]) == [("cannot decode image", 1),
                                                                                      ("empty image", 1)]
    scores = [r["ood_score"] for r in rep["most_ood"]]
    assert len(scores) == 16 and scores == sorted(scores, reverse=True)
    # flagged rows are exactly those above the marked threshold
    ok = t.filter(pa.compute.equal(t["status"], "ok"))
    above = np.array(ok["ood_score"].to_pylist()) > rep["ood_score_threshold"]
    assert above.sum() == rep["rows"]["flagged_ood"]
    html = (tmp_path / "report.html").read_text()
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert len(srcs) == 1 and srcs[0].startswith("data:image/png;base64,")  # the histogram only
    assert not re.search(r'(src|href)="(?!data:)', html) and "<link" not in html
    assert json.loads((tmp_path / "report.json").read_text())["rows"] == rep["rows"]


def test_report_with_moved_input_shows_images_and_renderings(audit: dict[str, Any], tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(audit["data"], moved)
    rep = build_report(ReportOptions(str(audit["scores"]), tmp_path / "out", input=str(moved), top=10),
                       echo=lambda _: None)
    assert len(rep["most_ood"]) == 10 and all(r["image_error"] is None for r in rep["most_ood"])
    html = (tmp_path / "out" / "report.html").read_text()
    srcs = re.findall(r'<img src="(data:image/png;base64,[^"]+)"', html)
    assert len(srcs) == 3 + 1 + 2  # runs over time, the latest run's most OOD and typical strips; histogram + 8 + 2
    assert "rendering h0" in html and rep["by_class"][0]["class"].startswith("c")


def test_report_on_a_root_with_two_runs_over_the_same_files_counts_each_row_once(audit: dict[str, Any],
                                                                                   tmp_path: Path) -> None:
    scores = tmp_path / "scores"
    shutil.copytree(audit["scores"], scores)
    r1 = json.loads((scores / "r1" / manifest.MANIFEST).read_text())
    part = scores / "r2" / "attempt-0" / "part-0.parquet"
    part.parent.mkdir(parents=True)
    t: pa.Table = audit["table"]
    newer = t.set_column(t.schema.get_field_index("model_id"), "model_id", pa.array(["newer"] * t.num_rows))
    pq.write_table(newer, part)
    manifest.commit(Store(), str(scores), "r2", {**{k: v for k, v in r1.items() if k not in ("format", "run_id")},
                                                 "created": "2999-01-01T00:00:00+00:00",
                                                 "outputs": [{"uri": str(part), "rows": t.num_rows}]})
    rep = build_report(ReportOptions(str(scores), tmp_path / "out"), echo=lambda _: None)
    assert rep["runs"] == ["r1", "r2"] and rep["rows"]["in"] == 22
    assert {r["source_path"]: r["rows"] for r in rep["by_file"]} == {
        str(audit["data"] / "a.parquet"): 14, str(audit["data"] / "b.parquet"): 8}
    assert rep["notes"] == ["22 rows were scored by more than one run; each input row counts once, with the newest "
                            "run's scores"]


def test_report_on_a_root_draws_the_runs_over_time_with_their_verdicts(audit: dict[str, Any], tmp_path: Path) -> None:
    from jobs.drift import Drift, Limits

    scores = tmp_path / "scores"
    shutil.copytree(audit["scores"], scores)
    r1 = json.loads((scores / "r1" / manifest.MANIFEST).read_text())
    drifted = Drift("latent_loglik", 20, 2, 9, 0.05, 64, 1e-7, 0.4, 1e-4).to_json(Limits())
    manifest.commit(Store(), str(scores), "r2", {**{k: v for k, v in r1.items() if k not in ("format", "run_id")},
                                                 "created": "2999-01-01T00:00:00+00:00", "drift": drifted})
    rep = build_report(ReportOptions(str(scores), tmp_path / "out"), echo=lambda _: None)
    assert [h["run_id"] for h in rep["history"]] == ["r1", "r2"]  # time order
    assert (rep["history"][1]["verdict"], rep["history"][1]["line"]) == ("drift", drifted["line"])
    html = (tmp_path / "out" / "report.html").read_text()
    assert "<h2>Runs over time</h2>" in html and 'alt="flagged fraction and KS distance per run"' in html
    assert f"Latest run: {drifted['line']}" in unescape(html)


def test_report_of_one_run_has_no_runs_over_time(audit: dict[str, Any], tmp_path: Path) -> None:
    rep = build_report(ReportOptions(str(audit["scores"] / "r1"), tmp_path), echo=lambda _: None)
    assert rep["history"] == [] and "Runs over time" not in (tmp_path / "report.html").read_text()


def test_newest_rows_keeps_the_last_row_of_each_input_row() -> None:
    t = pa.table({"source_path": ["a", "a", "b", "a"], "source_row": [0, 1, 0, 0], "run": [1, 1, 1, 2]})
    kept, dropped = newest_rows(t)
    assert dropped == 1 and kept.to_pylist() == [{"source_path": "a", "source_row": 1, "run": 1},
                                                 {"source_path": "b", "source_row": 0, "run": 1},
                                                 {"source_path": "a", "source_row": 0, "run": 2}]


def test_report_command_errors(tmp_path: Path) -> None:
    r = runner.invoke(app, ["report", "--scores", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and r.stderr.startswith("error: ") and "no committed run" in r.stderr
    with pytest.raises(ReportError, match="--top"):
        build_report(ReportOptions(str(tmp_path), tmp_path, top=0), echo=lambda _: None)


def test_report_command_writes_the_page(audit: dict[str, Any], tmp_path: Path) -> None:
    r = runner.invoke(app, ["report", "--scores", str(audit["scores"] / "r1"), "--out", str(tmp_path),
                            "--input", str(audit["data"]), "--top", "4"])
    assert r.exit_code == 0, r.output
    assert "flagged OOD" in r.output and (tmp_path / "report.html").is_file()


# ---------------------------------------------------------------------------- in a browser
def loaded_in_chromium(page: Path, tmp_path: Path) -> dict[str, str]:
    """The data-* attributes of <body> after headless Chromium has loaded ``page`` (set by its inline script)."""
    profile = tmp_path / f"profile-{page.parent.name}"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--run-all-compositor-stages-before-draw",
           "--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:500]
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1)))


@pytest.mark.browser
@pytest.mark.timeout(300)
def test_reports_render_in_headless_chromium_with_every_figure_loaded(audit: dict[str, Any], tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent (install Debian's chromium: apt-get install -y chromium)")
    # the audit report: figures embedded as data: URIs
    build_report(ReportOptions(str(audit["scores"]), tmp_path / "audit", input=str(audit["data"]), top=8),
                 echo=lambda _: None)
    # the evaluate report
    ck, data = audit["ck"], audit["data"]
    sets = [ScoredSet("in", "in", str(data / "a.parquet"), score_file(ck, data / "a.parquet")),
            ScoredSet("odd", "ood-odd", str(data / "b.parquet"), score_file(ck, data / "b.parquet"))]
    write_evaluation(sets, nrm.load(audit["ckpt"]), tmp_path / "eval", {"uri": str(audit["ckpt"]), "model_id": "x"})
    for page in (tmp_path / "audit" / "report.html", tmp_path / "eval" / "report.html"):
        n_img = len(re.findall(r"<img ", page.read_text()))
        assert n_img >= 2, page  # histogram(s) and at least one gallery
        assert loaded_in_chromium(page, tmp_path) == {"images-total": str(n_img), "images-broken": "0",
                                                       "images-loaded": "true"}, page
