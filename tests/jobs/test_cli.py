"""The `nrm-ood` command line through Typer's CliRunner, and once as the installed console script."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from support import make_checkpoint, outputs_of, png_bytes, random_images, write_hf_parquet
from typer.testing import CliRunner

from jobs.cli import app

runner = CliRunner(env={"COLUMNS": "200"})  # wide enough that Rich does not wrap error text


def invoke(*args: str) -> Any:
    return runner.invoke(app, list(args))


def read_scores(out: Path, run_id: str) -> pa.Table:
    m = json.loads((out / run_id / "_manifest.json").read_text())
    return pa.concat_tables([pq.read_table(o["uri"]) for o in outputs_of(m)])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("cli-ckpt") / "m")


@pytest.fixture(scope="module")
def scored(ckpt: Path, tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> dict[str, Any]:
    """`nrm-ood score` through CliRunner on two labelled shards; row 2 of a.parquet is corrupt."""
    root = tmp_path_factory.mktemp("cli")
    inp, out = root / "in", root / "out"
    inp.mkdir()
    imgs: list[bytes | None] = [png_bytes(p) for p in random_images(7, seed=41)]
    imgs[2] = b"not a png"
    write_hf_parquet(inp / "a.parquet", imgs, labels=list(range(7)), row_group_size=3)
    write_hf_parquet(inp / "b.parquet", [png_bytes(p) for p in random_images(5, seed=42)], labels=[10 + i for i in range(5)])
    result = invoke("score", "--model", str(ckpt), "--input", str(inp), "--output", str(out), "--run-id", "cli1",
                    "--batch-size", "4")
    return {"root": root, "in": inp, "out": out, "result": result}


# ---------------------------------------------------------------------------- help and parsing
def test_top_level_help_lists_the_commands() -> None:
    r = invoke("--help")
    assert r.exit_code == 0
    for cmd in ("train", "score", "runs", "filter"):
        assert cmd in r.stdout


def test_no_arguments_shows_help_as_a_usage_error() -> None:
    r = invoke()
    assert r.exit_code == 2 and "score" in r.output


def test_every_option_of_every_command_has_help() -> None:
    import typer

    group = typer.main.get_command(app)
    ctx = group.make_context("nrm-ood", ["--help"], resilient_parsing=True)
    missing = [f"{name} {p.name}" for name, cmd in group.commands.items()  # type: ignore[attr-defined]
               for p in cmd.get_params(ctx) if not getattr(p, "help", None)]
    assert missing == []


def test_runs_usage_names_its_argument_output() -> None:
    r = invoke("runs", "--help")
    assert r.exit_code == 0 and "runs [OPTIONS] {OUTPUT}" in r.stdout  # {} marks a required argument


@pytest.mark.parametrize(("command", "option", "shown"), [
    ("score", "--batch-size", "[N|auto]"), ("score", "--cpus-per-actor", "[> 0]"), ("train", "--epochs", "[>= 1]"),
    ("train", "--recon-weight", "[>= 0]"), ("evaluate", "--limit", "[>= 1]"), ("demo", "--epochs", "[>= 1]"),
])
def test_help_shows_the_range_that_is_enforced(command: str, option: str, shown: str) -> None:
    r = invoke(command, "--help")
    line = next(ln for ln in r.stdout.splitlines() if f" {option} " in ln)
    assert shown in line, line


@pytest.mark.parametrize(("args", "target"), [(["--write-docs"], "docs/benchmarks.md"), (["--out", "b/x.md"], "b/x.md")])
def test_bench_writes_a_file_only_when_asked(monkeypatch: pytest.MonkeyPatch, args: list[str], target: str) -> None:
    import jobs.bench

    seen: list[Path] = []
    monkeypatch.setattr(jobs.bench, "run", lambda out, *a: seen.append(out) or "report")
    r = invoke("bench", *args)
    assert r.exit_code == 0, r.output
    assert seen == [Path(target)] and f"wrote {target}" in r.stdout


def test_bench_by_default_prints_the_report_and_writes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    import jobs.bench

    seen: list[Path | None] = []
    monkeypatch.setattr(jobs.bench, "run", lambda out, *a: seen.append(out) or "# the report")
    r = invoke("bench")
    assert r.exit_code == 0, r.output
    assert seen == [None] and "# the report" in r.stdout and "wrote" not in r.stdout


def test_bench_passes_the_chosen_devices_to_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import jobs.bench

    seen: list[tuple[str, ...]] = []
    monkeypatch.setattr(jobs.bench, "run", lambda *a: seen.append(a[-2]) or "report")
    r = invoke("bench", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert seen == [("cpu",)]


def test_bench_passes_the_model_filter_to_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import jobs.bench

    seen: list[tuple[str, ...]] = []
    monkeypatch.setattr(jobs.bench, "run", lambda *a: seen.append(a[-1]) or "report")
    r = invoke("bench", "--only", "ResNet", "--only", "gray28")
    assert r.exit_code == 0, r.output
    assert seen == [("ResNet", "gray28")]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine where torch sees no GPU")
def test_bench_on_cuda_without_a_gpu_is_refused_before_measuring(monkeypatch: pytest.MonkeyPatch) -> None:
    import jobs.bench

    seen: list[object] = []
    monkeypatch.setattr(jobs.bench, "run", lambda *a: seen.append(a) or "report")
    r = invoke("bench", "--device", "cuda")
    assert r.exit_code == 2 and seen == []
    assert "torch sees no CUDA GPU" in r.output


def test_score_help_documents_the_options() -> None:
    r = invoke("score", "--help")
    assert r.exit_code == 0
    for opt in ("--model", "--input", "--output", "--actors", "--cpus-per-actor", "--batch-size", "--run-id",
                "--incremental", "--resize-policy", "--image-column", "--endpoint-url"):
        assert opt in r.stdout, opt
    assert "adapt" in r.stdout and "strict" in r.stdout


@pytest.mark.parametrize(("args", "text"), [
    (["--batch-size", "0"], "'0' is not a batch size; expected a whole number of rows >= 1, or auto"),
    (["--memory-budget", "lots"], "'lots' is not a memory budget; expected a size with a unit, such as 6GiB"),
    (["--memory-budget", "0%"], "'0%' is not a memory budget; expected a percentage above 0% and at most 100%"),
    (["--actors", "0"], "must be >= 1, got 0"),
    (["--gpus-per-actor", "-1"], "must be >= 0, got -1"),
    (["--cpus-per-actor", "0"], "must be > 0, got 0"),
    (["--resize-policy", "bogus"], "'bogus' is not one of 'adapt', 'strict'"),
    (["--batch-size", "many"], "Invalid value for '--batch-size'"),
])
def test_bad_values_are_usage_errors(tmp_path: Path, args: list[str], text: str) -> None:
    r = invoke("score", "--model", str(tmp_path / "m"), "--input", str(tmp_path), "--output", str(tmp_path / "o"),
               *args)
    assert r.exit_code == 2, r.output
    assert text in r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("run_id", "text"), [
    ("x" * 300, "'" + "x" * 40 + "'... is 300 characters long; expected at most 128 letters, digits"),
    (" x", "' x' is not a run id (it must not contain '/' or start with '.' or '_')"),
])
def test_a_run_id_that_cannot_name_a_folder_is_a_usage_error(tmp_path: Path, run_id: str, text: str) -> None:
    r = invoke("score", "--model", str(tmp_path / "m"), "--input", str(tmp_path), "--output", str(tmp_path / "o"),
               "--run-id", run_id)
    assert r.exit_code == 2 and text in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


def test_missing_required_option_is_a_usage_error(tmp_path: Path) -> None:
    r = invoke("score", "--input", str(tmp_path), "--output", str(tmp_path / "o"))
    assert r.exit_code == 2 and "--model" in r.output


def test_missing_checkpoint_is_one_clear_error_line(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-ckpt"
    r = invoke("score", "--model", str(missing), "--input", str(tmp_path), "--output", str(tmp_path / "o"),
               "--run-id", "x")
    assert r.exit_code == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and str(missing) in lines[0] and "config.json" in lines[0]
    assert "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------- score, runs, filter
@pytest.mark.ray
def test_score_prints_the_summary(scored: dict[str, Any]) -> None:
    r = scored["result"]
    assert r.exit_code == 0, r.output
    assert "run cli1: 2 input file(s), 12 rows, 0 unreadable file(s)" in r.stdout
    assert "run cli1: complete" in r.stdout
    assert "rows 12  ok 11  errors 1" in r.stdout
    assert f"manifest {scored['out'] / 'cli1' / '_manifest.json'}" in r.stdout


@pytest.mark.ray
def test_score_again_is_already_committed(scored: dict[str, Any], ckpt: Path) -> None:
    r = invoke("score", "--model", str(ckpt), "--input", str(scored["in"]), "--output", str(scored["out"]),
               "--run-id", "cli1")
    assert r.exit_code == 0
    assert "run cli1 is already committed" in r.stdout


@pytest.mark.ray
def test_runs_lists_the_committed_run(scored: dict[str, Any]) -> None:
    r = invoke("runs", str(scored["out"]))
    assert r.exit_code == 0
    line = next(ln for ln in r.stdout.splitlines() if " cli1 " in ln)
    ood = int(pc.sum(read_scores(scored["out"], "cli1")["is_ood"]).as_py())
    expected = json.loads((scored["out"] / "cli1" / "_manifest.json").read_text())["drift"]["expected"]
    assert line.split()[1:6] == ["cli1", "12", "1", f"{ood / 11:.1%}", f"{expected:.1%}"]  # flagged: of ok rows


def test_runs_on_an_empty_output(tmp_path: Path) -> None:
    r = invoke("runs", str(tmp_path))
    assert r.exit_code == 0 and "no committed runs under" in r.stdout


@pytest.mark.ray
def test_filter_writes_the_kept_rows(scored: dict[str, Any], tmp_path: Path) -> None:
    scores = read_scores(scored["out"], "cli1")
    keep = scores.filter(pc.and_(pc.equal(scores["status"], "ok"), pc.invert(pc.fill_null(scores["is_ood"], True))))
    expect = sorted(keep["label"].to_pylist())
    ood = int(pc.sum(scores["is_ood"]).as_py())
    assert 0 < len(expect) < 11  # the data must exercise both sides
    r = invoke("filter", "--scores", str(scored["out"] / "cli1"), "--input", str(scored["in"]),
               "--output", str(tmp_path / "clean"))
    assert r.exit_code == 0, r.output
    assert f"kept {len(expect)} of 12 rows ({ood} OOD, 1 error, 0 not scored)" in r.stdout
    assert sorted(os.listdir(tmp_path / "clean")) == ["a.parquet", "b.parquet"]
    kept = pa.concat_tables([pq.read_table(tmp_path / "clean" / n) for n in ("a.parquet", "b.parquet")])
    assert sorted(kept["label"].to_pylist()) == expect  # labels are unique per row: they name the rows
    src = pa.concat_tables([pq.read_table(scored["in"] / n) for n in ("a.parquet", "b.parquet")])
    assert kept.schema == src.schema
    by_label = {row["label"]: row["image"] for row in src.to_pylist()}
    assert all(row["image"] == by_label[row["label"]] for row in kept.to_pylist())


@pytest.mark.ray
def test_filter_on_the_output_root_reads_every_run(scored: dict[str, Any], tmp_path: Path) -> None:
    r = invoke("filter", "--scores", str(scored["out"]), "--input", str(scored["in"]),
               "--output", str(tmp_path / "clean"))
    assert r.exit_code == 0, r.output
    assert "of 12 rows" in r.stdout


def test_filter_without_a_committed_run_is_one_error_line(tmp_path: Path) -> None:
    r = invoke("filter", "--scores", str(tmp_path / "out" / "nope"), "--input", str(tmp_path),
               "--output", str(tmp_path / "clean"))
    assert r.exit_code == 1
    assert r.stderr.startswith("error: no committed run at") and "Traceback" not in r.output


# ---------------------------------------------------------------------------- bad runs a new user meets
def test_output_naming_an_existing_file_is_one_sentence_and_writes_nothing(ckpt: Path, tmp_path: Path) -> None:
    write_hf_parquet(tmp_path / "a.parquet", [png_bytes(p) for p in random_images(2)])
    (tmp_path / "taken.txt").write_text("mine")
    before = sorted(p.name for p in tmp_path.iterdir())
    r = invoke("score", "--model", str(ckpt), "--input", str(tmp_path / "a.parquet"),
               "--output", str(tmp_path / "taken.txt"))
    assert r.exit_code == 1
    assert r.stderr == (f"error: --output {str(tmp_path / 'taken.txt')!r} is an existing file; expected a directory "
                        "(or s3:// prefix) to hold the runs\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == before and (tmp_path / "taken.txt").read_text() == "mine"


def test_ctrl_c_says_nothing_was_committed_and_how_to_resume(ckpt: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from jobs.pipeline import Run

    def interrupted(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Run, "score", interrupted)
    write_hf_parquet(tmp_path / "a.parquet", [png_bytes(p) for p in random_images(2)])
    r = invoke("score", "--model", str(ckpt), "--input", str(tmp_path / "a.parquet"), "--output",
               str(tmp_path / "out"), "--run-id", "ctrlc")
    assert r.exit_code == 130
    assert r.stderr.startswith("error: interrupted: run ctrlc was not committed") and r.stderr.count("\n") == 1
    assert "rerun the same command with --resume ctrlc" in r.stderr
    assert not (tmp_path / "out" / "ctrlc" / "_manifest.json").exists()


def test_runs_on_a_missing_path_exits_1_naming_it(tmp_path: Path) -> None:
    r = invoke("runs", str(tmp_path / "nope"))
    assert r.exit_code == 1
    assert r.stderr == f"error: {str(tmp_path / 'nope')!r} does not exist; expected the --output given to `score`\n"


@pytest.mark.ray
def test_every_input_failed_exits_1_and_the_corrected_command_scores(ckpt: Path, tmp_path: Path,
                                                                     ray_local: None) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.parquet").write_bytes(b"PAR1 not parquet")
    args = ["score", "--model", str(ckpt), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
            "--run-id", "allbad"]
    r = invoke(*args)
    assert r.exit_code == 1 and r.stderr.startswith("error: every input file failed (1; first ")
    assert "nothing was committed" in r.stderr and not (tmp_path / "out").exists()
    write_hf_parquet(tmp_path / "in" / "a.parquet", [png_bytes(p) for p in random_images(3)])
    r = invoke(*args)
    assert r.exit_code == 0 and "run allbad: complete" in r.stdout


@pytest.mark.ray
def test_adapt_policy_counts_converted_and_resized_rows(ckpt: Path, tmp_path: Path, ray_local: None) -> None:
    rgb16 = [png_bytes(p) for p in random_images(3, size=16, channels=3, seed=5)]
    write_hf_parquet(tmp_path / "a.parquet", [*rgb16, *[png_bytes(p) for p in random_images(2, seed=6)]])
    r = invoke("score", "--model", str(ckpt), "--input", str(tmp_path / "a.parquet"), "--output",
               str(tmp_path / "out"), "--run-id", "ad")
    assert r.exit_code == 0, r.output
    assert "--resize-policy adapt: 3 row(s) colour-converted, 3 resized to the model's input" in r.stdout
    m = json.loads((tmp_path / "out" / "ad" / "_manifest.json").read_text())
    assert m["adapted"] == {"policy": "adapt", "converted": 3, "resized": 3}


# ---------------------------------------------------------------------------- incomplete runs
@pytest.fixture(scope="module")
def incomplete(ckpt: Path, tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("cli-bad")
    inp, out = root / "in", root / "out"
    inp.mkdir()
    write_hf_parquet(inp / "good.parquet", [png_bytes(p) for p in random_images(4, seed=43)], labels=[0] * 4)
    write_hf_parquet(root / "whole.parquet", [png_bytes(p) for p in random_images(4, seed=44)])
    data = (root / "whole.parquet").read_bytes()
    (inp / "trunc.parquet").write_bytes(data[: len(data) - 20])
    r = invoke("score", "--model", str(ckpt), "--input", str(inp), "--output", str(out), "--run-id", "bad")
    return {"in": inp, "out": out, "result": r}


@pytest.mark.ray
def test_an_incomplete_run_committed_already_says_it_was_incomplete(incomplete: dict[str, Any], ckpt: Path) -> None:
    r = invoke("score", "--model", str(ckpt), "--input", str(incomplete["in"]), "--output", str(incomplete["out"]),
               "--run-id", "bad")
    assert r.exit_code == 0
    assert r.stdout.startswith("run bad is already committed (incomplete: 1 input file(s) failed; ")
    assert "score again under a new --run-id to retry the failed inputs" in r.stdout


@pytest.mark.ray
def test_incomplete_run_exits_3_and_names_the_failed_input(incomplete: dict[str, Any]) -> None:
    r = incomplete["result"]
    assert r.exit_code == 3, r.output
    assert "run bad: incomplete" in r.stdout
    assert f"failed input {incomplete['in'] / 'trunc.parquet'}: cannot read Parquet footer" in r.stdout
    m = json.loads((incomplete["out"] / "bad" / "_manifest.json").read_text())
    assert m["rows"] == {"in": 4, "ok": 4, "error": 0}


@pytest.mark.ray
def test_filter_after_an_incomplete_run_keeps_the_readable_file_and_names_the_failed_one(
        incomplete: dict[str, Any], tmp_path: Path) -> None:
    r = invoke("filter", "--scores", str(incomplete["out"] / "bad"), "--input", str(incomplete["in"]),
               "--output", str(tmp_path / "clean"))
    assert r.exit_code == 0, r.output
    kept = re.search(r"kept (\d) of 4 rows \((\d) OOD, 0 error, 0 not scored\)", r.stdout)
    assert kept and int(kept[1]) + int(kept[2]) == 4, r.stdout
    assert f"skipped {incomplete['in'] / 'trunc.parquet'}: no scored rows in these runs" in r.stdout
    assert pq.read_table(tmp_path / "clean").num_rows == int(kept[1])


@pytest.mark.ray
def test_filter_keeps_inputs_with_the_same_basename_apart(ckpt: Path, tmp_path: Path, ray_local: None) -> None:
    inp = tmp_path / "in"
    for sub, seed in (("x", 45), ("y", 46)):
        (inp / sub).mkdir(parents=True)
        write_hf_parquet(inp / sub / "part-0.parquet", [png_bytes(p) for p in random_images(6, seed=seed)],
                         labels=list(range(6)))
    r = invoke("score", "--model", str(ckpt), "--input", str(inp), "--output", str(tmp_path / "out"), "--run-id", "dup")
    assert r.exit_code == 0, r.output
    r = invoke("filter", "--scores", str(tmp_path / "out" / "dup"), "--input", str(inp),
               "--output", str(tmp_path / "clean"))
    assert r.exit_code == 0, r.output
    kept = int(r.stdout.split("kept ", 1)[1].split()[0])
    written = sum(pq.read_metadata(p).num_rows for p in (tmp_path / "clean").rglob("*.parquet"))
    assert written == kept, f"the summary says {kept} rows were kept, {written} are on disk"


# ---------------------------------------------------------------------------- the installed console script
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_console_script_scores_in_a_subprocess(ckpt: Path, tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("nrm-ood")
    assert exe.is_file()
    (tmp_path / "in").mkdir()
    write_hf_parquet(tmp_path / "in" / "a.parquet", [png_bytes(p) for p in random_images(6, seed=47)] + [b""],
                     labels=[1] * 7, row_group_size=4)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([str(exe), "score", "--model", str(ckpt), "--input", str(tmp_path / "in"),
                        "--output", str(tmp_path / "out"), "--run-id", "sub", "--batch-size", "4"],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "rows 7  ok 6  errors 1" in r.stdout
    m = json.loads((tmp_path / "out" / "sub" / "_manifest.json").read_text())
    assert m["status"] == "complete" and m["rows"] == {"in": 7, "ok": 6, "error": 1}
    t = read_scores(tmp_path / "out", "sub")
    assert t.num_rows == 7 and t.filter(pc.equal(t["status"], "error"))["error"].to_pylist() == [
        "empty image (no bytes)"]


# ---------------------------------------------------------------------------- train
def test_train_writes_a_checkpoint_and_its_report(tmp_path: Path) -> None:
    import nrm

    write_hf_parquet(tmp_path / "train.parquet", [png_bytes(p) for p in random_images(200, seed=6)],
                     labels=[i % 3 for i in range(200)])
    out = tmp_path / "ckpt"
    r = invoke("train", "--data", str(tmp_path / "train.parquet"), "--test", str(tmp_path / "train.parquet"),
               "--out", str(out), "--epochs", "1", "--recon-weight", "0", "--augment", "crop", "--device", "cpu")
    assert r.exit_code == 0, r.output
    report = json.loads((out / "train_report.json").read_text())
    assert report["arch"] == "digits8" and report["augment"] == "crop" and report["train_rows"] == 200
    assert report["test_rows"] == 200 and 0.0 <= report["test_accuracy"] <= 1.0
    model = nrm.load(out)
    assert model.input_shape == (1, 8, 8) and len(model.config.classes) == 3
    assert report["model_id"] == nrm.model_id(out)


def test_train_holds_out_the_fraction_of_rows_asked_for(tmp_path: Path) -> None:
    write_hf_parquet(tmp_path / "train.parquet", [png_bytes(p) for p in random_images(200, seed=6)],
                     labels=[i % 3 for i in range(200)])
    out = tmp_path / "ckpt"
    r = invoke("train", "--data", str(tmp_path / "train.parquet"), "--out", str(out), "--epochs", "1",
               "--recon-weight", "0", "--device", "cpu", "--val-fraction", "0.02")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "train_report.json").read_text())["val_rows"] == 4


def _train_one_epoch(tmp_path: Path, seed: int, *options: str) -> tuple[Path, dict[str, Any]]:
    """`nrm-ood train` for one epoch, cross-entropy only, on 120 random 3-class rows; (out, its report)."""
    write_hf_parquet(tmp_path / "train.parquet", [png_bytes(p) for p in random_images(120, seed=seed)],
                     labels=[i % 3 for i in range(120)])
    out = tmp_path / "out"
    r = invoke("train", "--data", str(tmp_path / "train.parquet"), "--out", str(out), "--epochs", "1",
               "--recon-weight", "0", "--device", "cpu", *options)
    assert r.exit_code == 0, r.output
    return out, json.loads((out / "train_report.json").read_text())


def test_train_distils_from_a_teacher_checkpoint(ckpt: Path, tmp_path: Path) -> None:
    _, report = _train_one_epoch(tmp_path, 8, "--teacher", str(ckpt), "--distill-weight", "0.7")
    assert (report["teacher"], report["distill_weight"]) == ([str(ckpt)], 0.7)


def test_train_refuses_a_teacher_with_other_classes(ckpt: Path, tmp_path: Path) -> None:
    write_hf_parquet(tmp_path / "train.parquet", [png_bytes(p) for p in random_images(40, seed=8)],
                     labels=[i % 5 for i in range(40)])
    r = invoke("train", "--data", str(tmp_path / "train.parquet"), "--out", str(tmp_path / "o"), "--epochs", "1",
               "--device", "cpu", "--teacher", str(ckpt))
    assert r.exit_code == 1 and "the teacher has 3 classes, the student 5" in r.output
    assert not (tmp_path / "o").exists()


def test_train_fine_tunes_with_batchnorm_into_the_same_graph(ckpt: Path, tmp_path: Path) -> None:
    import nrm

    out, report = _train_one_epoch(tmp_path, 9, "--init", str(ckpt), "--batchnorm", "--optimizer", "sgd")
    assert report["batchnorm"] is True
    assert nrm.load(out).config.nodes == nrm.load(ckpt).config.nodes


def test_train_in_bf16_writes_a_float32_checkpoint_and_names_its_precision(ckpt: Path, tmp_path: Path) -> None:
    import torch

    import nrm

    out, report = _train_one_epoch(tmp_path, 9, "--init", str(ckpt), "--precision", "bf16")
    assert report["precision"] == "bf16"
    assert {t.dtype for t in nrm.load(out).state_dict().values()} == {torch.float32}


def test_train_refuses_fp16_at_parse_time(tmp_path: Path) -> None:
    r = invoke("train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--precision", "fp16")
    assert r.exit_code == 2 and "'fp16' is not one of 'fp32', 'bf16', 'tf32'" in r.output
    assert not (tmp_path / "o").exists()


def test_train_refuses_batchnorm_with_the_reconstruction_term(tmp_path: Path) -> None:
    r = invoke("train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--batchnorm")
    assert r.exit_code == 1 and "--recon-weight is 1.0; add --recon-weight 0" in r.output
    assert not (tmp_path / "o").exists()


def test_average_writes_the_mean_of_the_checkpoints_weights(ckpt: Path, tmp_path: Path) -> None:
    import torch

    import nrm

    other = make_checkpoint(tmp_path / "other", seed=1)
    r = invoke("average", "--model", str(ckpt), "--model", str(other), "--out", str(tmp_path / "soup"))
    assert r.exit_code == 0, r.output
    assert "validation accuracy" not in r.output and "test accuracy" not in r.output
    assert "averaged 2 checkpoints" in r.output and "next: nrm-ood fit-detector" in r.output
    a, b, soup = nrm.load(ckpt), nrm.load(other), nrm.load(tmp_path / "soup")
    torch.testing.assert_close(soup.node_params("conv1")["weight"],
                               (a.node_params("conv1")["weight"] + b.node_params("conv1")["weight"]) / 2)


def test_average_reports_validation_and_test_accuracy(ckpt: Path, tmp_path: Path) -> None:
    write_hf_parquet(tmp_path / "train.parquet", [png_bytes(p) for p in random_images(50, seed=12)],
                     labels=[i % 3 for i in range(50)])
    other = make_checkpoint(tmp_path / "other", seed=1)
    r = invoke("average", "--model", str(ckpt), "--model", str(other), "--out", str(tmp_path / "soup"),
               "--data", str(tmp_path / "train.parquet"), "--test", str(tmp_path / "train.parquet"))
    assert r.exit_code == 0, r.output
    assert re.search(r"validation accuracy \d\.\d{4} \(5 held-out rows of ", r.output)
    assert re.search(r"test accuracy \d\.\d{4} \(", r.output)


def test_average_refuses_a_single_checkpoint(ckpt: Path, tmp_path: Path) -> None:
    r = invoke("average", "--model", str(ckpt), "--out", str(tmp_path / "soup"))
    assert r.exit_code == 1 and "a weight average needs at least 2 models, got 1" in r.output
    assert not (tmp_path / "soup").exists()


def test_train_refuses_an_unknown_augmentation(tmp_path: Path) -> None:
    r = invoke("train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--augment", "rotate")
    assert r.exit_code == 2 and "'rotate' is not one of" in r.output and "flip-crop" in r.output
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------- fit-detector
def test_fit_detector_chooses_on_validation_ood_sets(ckpt: Path, tmp_path: Path) -> None:
    import numpy as np

    write_hf_parquet(tmp_path / "train.parquet", [png_bytes(p) for p in random_images(300, seed=5)],
                     labels=[i % 3 for i in range(300)])
    flat = np.repeat(np.arange(60, dtype=np.uint8)[:, None, None, None] * 4, 64, axis=1).reshape(60, 8, 8, 1)
    write_hf_parquet(tmp_path / "flat.parquet", [png_bytes(p) for p in flat])  # unlabelled, as OOD sets are
    out = tmp_path / "fitted"
    r = invoke("fit-detector", "--model", str(ckpt), "--data", str(tmp_path / "train.parquet"), "--out", str(out),
               "--val-ood", f"flat={tmp_path / 'flat.parquet'}", "--val-fraction", "0.5")
    assert r.exit_code == 0, r.output
    saved = json.loads((out / "config.json").read_text())["detectors"]  # the main detector first
    det = {"name": saved["fitted"][0]["name"], "features": saved["fitted"][0]["options"]["features"],
           "selection": saved["selection"]}
    assert set(det["selection"]["det_mahalanobis_gates"]) == {"flat"}
    winner = f"det_{det['name']}_{det['features']}"
    assert min(det["selection"][winner].values()) == max(min(v.values()) for v in det["selection"].values())
    assert f"validation AUROC {winner}: flat " in r.output
    assert f"fitted {det['name']}[{det['features']}] on half of 150 held-out rows; threshold det_{det['name']} <" in r.output
    assert json.loads((out / "config.json").read_text())["threshold"]["score"] == f"det_{det['name']}"


def test_fit_detector_fits_on_training_rows_when_asked(ckpt: Path, tmp_path: Path) -> None:
    write_hf_parquet(tmp_path / "train.parquet", [png_bytes(p) for p in random_images(300, seed=5)],
                     labels=[i % 3 for i in range(300)])
    out = tmp_path / "fitted"
    r = invoke("fit-detector", "--model", str(ckpt), "--data", str(tmp_path / "train.parquet"), "--out", str(out),
               "--val-fraction", "0.2", "--detector-rows", "100")
    assert r.exit_code == 0, r.output
    assert "fitted mahalanobis[gates_acts] on 100 training rows; threshold det_mahalanobis <" in r.output


def test_fit_detector_with_no_choice_given_applies_the_default_rule(ckpt: Path, tmp_path: Path) -> None:
    from nrm.detectors import default

    write_hf_parquet(tmp_path / "train.parquet", [png_bytes(p) for p in random_images(300, seed=5)],
                     labels=[i % 3 for i in range(300)])
    out = tmp_path / "fitted"
    r = invoke("fit-detector", "--model", str(ckpt), "--data", str(tmp_path / "train.parquet"), "--out", str(out),
               "--val-fraction", "0.5")
    assert r.exit_code == 0, r.output
    saved = json.loads((out / "config.json").read_text())
    main, table = saved["detectors"]["fitted"][0], saved["detectors"]["selection"]
    assert len(table) == len(default.ROWS) * len(default.SEARCH)
    won = [k for k in table if k.endswith(f":det_{main['name']}_{main['options']['features']}")
           and table[k]["patches"] == max(v["patches"] for v in table.values())]
    assert won and "the default rule chose on 150 patch-shuffled training rows" in r.output
    assert saved["threshold"]["score"] == f"det_{main['name']}"


def test_fit_detector_given_a_detector_fits_it_on_half_the_held_out_rows(ckpt: Path, tmp_path: Path) -> None:
    write_hf_parquet(tmp_path / "train.parquet", [png_bytes(p) for p in random_images(300, seed=5)],
                     labels=[i % 3 for i in range(300)])
    r = invoke("fit-detector", "--model", str(ckpt), "--data", str(tmp_path / "train.parquet"),
               "--out", str(tmp_path / "fitted"), "--val-fraction", "0.2", "--detector", "mahalanobis_energy")
    assert r.exit_code == 0, r.output
    assert "fitted mahalanobis_energy[gates_acts] on half of 60 held-out rows; threshold det_mahalanobis_energy <" in r.output


def test_fit_detector_fits_the_fixed_candidate_when_the_images_cannot_be_patch_shuffled(tmp_path: Path) -> None:
    from nrm.detectors import default

    ckpt6 = make_checkpoint(tmp_path / "m6", size=6)
    write_hf_parquet(tmp_path / "train.parquet", [png_bytes(p) for p in random_images(200, size=6, seed=5)],
                     labels=[i % 3 for i in range(200)])
    r = invoke("fit-detector", "--model", str(ckpt6), "--data", str(tmp_path / "train.parquet"),
               "--out", str(tmp_path / "fitted"), "--val-fraction", "0.2")
    assert r.exit_code == 0, r.output
    _, name, features = default.FIXED
    assert "no patch-shuffled validation set (patches: images of 6x6 pixels" in r.output
    assert f"fitted {name}[{features}] on 160 training rows; threshold det_{name} <" in r.output


@pytest.mark.parametrize("spec", ["flat", "=x.parquet", "in=x.parquet"])
def test_fit_detector_refuses_a_bad_val_ood_spec(ckpt: Path, tmp_path: Path, spec: str) -> None:
    r = invoke("fit-detector", "--model", str(ckpt), "--data", str(tmp_path), "--out", str(tmp_path / "o"),
               "--val-ood", spec)
    assert r.exit_code == 2 and f"--val-ood {spec!r}" in r.output
    assert not (tmp_path / "o").exists()


REQUIRED = {"train": ["--data", "d", "--out", "o"], "fit-detector": ["--model", "m", "--data", "d", "--out", "o"],
            "score": ["--model", "m", "--input", "i", "--output", "o"], "bench": []}


@pytest.mark.parametrize(("command", "option"), [
    ("train", "--arch"), ("train", "--augment"), ("train", "--optimizer"), ("train", "--normaliser"),
    ("train", "--precision"), ("fit-detector", "--detector"), ("fit-detector", "--features"), ("score", "--precision"),
    ("bench", "--section"), ("score", "--decode"), ("fit-detector", "--decode"),
])
def test_cli_choices_match_the_library(command: str, option: str) -> None:
    """Each choice the CLI offers is refused at parse time listing the library's own names (nrm.names, jobs.bench)."""
    from jobs.bench import SECTIONS
    from nrm import names

    library = {"--arch": ("auto", *names.PRESETS), "--augment": names.AUGMENTATIONS, "--optimizer": names.OPTIMIZERS,
               "--normaliser": names.NORMALISERS, "--detector": names.DETECTORS, "--features": names.FEATURE_SETS,
               "--section": SECTIONS, "--precision": names.TRAIN_PRECISIONS if command == "train" else names.RUN_PRECISIONS,
               "--decode": names.DECODES}
    r = invoke(command, *REQUIRED[command], option, "bogus")
    assert r.exit_code == 2 and f"'bogus' is not one of {', '.join(map(repr, library[option]))}." in r.output


def test_the_names_module_matches_the_library() -> None:
    """nrm.names lists what the library's registries hold."""
    from nrm import detectors, names, presets

    assert tuple(presets.PRESETS) == names.PRESETS
    assert tuple(detectors.REGISTRY) == (*names.DETECTORS, *names.POSTHOC)
    on_statistics = [n for n, c in detectors.REGISTRY.items() if issubclass(c, detectors.StatisticsDetector)]
    assert tuple(on_statistics) == names.DETECTORS
    assert tuple(c().column for c in detectors.REGISTRY.values() if issubclass(c, detectors.BaselineDetector)) == names.POSTHOC


def test_importing_the_names_imports_no_torch(tmp_path: Path) -> None:
    import subprocess
    import sys

    probe = "import sys, nrm.names; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_an_unknown_score_column_is_a_usage_error_naming_it() -> None:
    r = invoke("score", "--model", "m", "--input", "i", "--output", "o", "--columns", "max_softmax,pixels")
    assert r.exit_code == 2 and "unknown score column(s) 'pixels'" in r.output


def test_an_unknown_feature_set_is_a_usage_error_listing_the_choices() -> None:
    r = invoke("fit-detector", "--model", "m", "--data", "d", "--out", "o", "--features", "pixels")
    assert r.exit_code == 2 and "'pixels' is not one of" in r.output and "gates_acts" in r.output
