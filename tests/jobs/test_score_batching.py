"""jobs.pipeline.batching and the scoring actor's pieces: --batch-size auto and --memory-budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from support import OutOfMemoryAbove, make_checkpoint, random_images

from jobs.pipeline import Checkpoint, JobError, ScoreOptions, Scorer, run_score
from jobs.pipeline.batching import Batching, batching, parse_batch_size
from jobs.storage import Store


def test_auto_is_the_default_above_64_px_and_probes() -> None:
    b = batching(None, None, (3, 224, 224), cpus=1, gpus=0)
    assert b.auto and b.rows == 104  # 16 MiB of 224 px RGB pixels, a multiple of 8


def test_a_gpu_actor_gets_larger_ray_batches_under_auto() -> None:
    assert batching("auto", None, (3, 224, 224), cpus=1, gpus=1).rows == 440  # 64 MiB of pixels


def test_thumbnails_keep_the_fixed_batch_by_default() -> None:
    b = batching(None, None, (3, 64, 64), cpus=1, gpus=0)
    assert not b.auto and b.rows == 512


@pytest.mark.parametrize("text", ["0", "-3", "many", "2.5"])
def test_a_bad_batch_size_names_the_value_and_what_was_expected(text: str) -> None:
    with pytest.raises(ValueError, match=f"^{text!r} is not a batch size; expected a whole number of rows >= 1, or auto$"):
        parse_batch_size(text)


def _scorer(tmp_path: Path, batch: Batching) -> Scorer:
    return Scorer(Checkpoint.fetch(Store(), str(make_checkpoint(tmp_path / "m"))), 1, batching=batch)


def test_an_actor_under_auto_scores_in_the_pieces_its_budget_fits(tmp_path: Path) -> None:
    small, large = _scorer(tmp_path, Batching(4096, True, "200kB")), _scorer(tmp_path, Batching(4096, True, "2MB"))
    assert 1 < small.rows < large.rows < 4096


def _batch(n: int) -> dict[str, np.ndarray]:
    pixels = random_images(n, seed=3)  # (n, 8, 8, 1) uint8
    pixels[:, 0, 0] = 0
    pixels[4, 0, 0] = 255  # normalised to 2.0: the row support.OutOfMemoryAbove never fits
    return {"id": np.array([f"r{i}" for i in range(n)], dtype=object), "source_path": np.array(["x"] * n, dtype=object),
            "source_row": np.arange(n), "label": np.zeros(n, dtype=np.int64), "has_label": np.zeros(n, dtype=bool),
            "error": np.array([""] * n, dtype=object), "pixels": pixels}


def test_a_row_that_alone_runs_out_of_memory_is_the_only_error_row(tmp_path: Path) -> None:
    scorer = _scorer(tmp_path, Batching(8))
    scorer.runner = OutOfMemoryAbove(scorer.model, limit=8, poison=2.0)  # fault injection: the real scoring beneath
    table = scorer(_batch(10)).to_pydict()
    assert table["status"] == ["ok"] * 4 + ["error"] + ["ok"] * 5
    assert table["error"][4].startswith("scoring failed: out of memory scoring one row")
    assert None not in table["max_logit"][:4] + table["max_logit"][5:]


@pytest.mark.ray
@pytest.mark.usefixtures("ray_local")
def test_a_run_under_auto_scores_as_a_fixed_batch_does(tmp_path: Path) -> None:
    from support import png_bytes, write_hf_parquet

    ckpt = make_checkpoint(tmp_path / "m")
    write_hf_parquet(tmp_path / "a.parquet", [png_bytes(p) for p in random_images(40, seed=5)], row_group_size=10)
    runs = {b: run_score(ScoreOptions(str(ckpt), str(tmp_path / "a.parquet"), str(tmp_path / "out"), run_id=f"b{b}",
                                      batch_size=b, memory_budget="300kB"), echo=lambda _m: None)
            for b in ("auto", 8)}
    import pyarrow.parquet as pq
    from support import outputs_of

    tables = {b: pq.read_table([o["uri"] for o in outputs_of(r.manifest)]).sort_by("id") for b, r in runs.items()}
    assert runs["auto"].manifest["options"]["batch_size"] == "auto"
    assert tables["auto"].column("status").to_pylist() == ["ok"] * 40
    np.testing.assert_allclose(tables["auto"].column("latent_loglik").to_numpy(),
                               tables[8].column("latent_loglik").to_numpy(), rtol=1e-5)


def test_a_bad_memory_budget_is_a_job_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(JobError, match="^--memory-budget '6 parsecs' is not a memory budget; expected a size"):
        run_score(ScoreOptions(str(tmp_path), str(tmp_path), str(tmp_path / "out"), memory_budget="6 parsecs"))
