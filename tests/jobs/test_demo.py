"""The README's main command, `nrm-ood demo`, end to end on embedded Ray (fewer epochs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.demo import below_chance, run


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_trains_scores_commits_and_reports(tmp_path: Path, ray_local: None) -> None:
    lines: list[str] = []
    result = run(tmp_path, epochs=8, echo=lines.append)
    assert result["exit_code"] == 0
    assert result["accuracy"] > 0.8
    assert sorted(result["auroc"]) == ["ood-blocks", "ood-noise", "ood-stripes"]
    for row in result["auroc"].values():
        assert set(row) >= {"det_mahalanobis", "latent_loglik", "max_softmax", "energy"}
        assert all(0.0 <= v <= 1.0 for v in row.values())
    m = json.loads((tmp_path / "scores" / "demo" / "_manifest.json").read_text())
    assert m["status"] == "complete"
    assert m["rows"]["in"] == m["rows"]["ok"] + m["rows"]["error"] == 540 * 4
    assert m["threshold"]["score"] == "det_mahalanobis"
    assert any(line.startswith("AUROC, in-distribution = positive") for line in lines)
    assert result["threshold_score"] == "det_mahalanobis"
    header = next(line for line in lines if line.startswith("OOD set"))
    assert header.split()[2] == "det_mahalanobis*"  # the score that decides is_ood comes first, marked
    assert any(line.startswith("* decides is_ood: a row is flagged when det_mahalanobis < ") for line in lines)


def test_below_chance_explains_latent_loglik_with_the_medians() -> None:
    import pandas as pd

    table = pd.DataFrame({"set": ["in", "in", "ood-a", "ood-a", "ood-b", "ood-b"],
                          "latent_prior": [-2.0, -2.0, -1.0, -1.0, -3.0, -3.0]})
    rows = {"ood-a": {"latent_loglik": 0.2}, "ood-b": {"latent_loglik": 0.9}}
    (line,) = below_chance(table, rows, "det_x")
    assert line.startswith("latent_loglik is below chance on ood-a: ") and "ood-b" not in line
    assert "(median ood-a -1 against -2 for the digits)" in line and "det_x models which units fire" in line
    assert below_chance(table, {"ood-b": {"latent_loglik": 0.9}}, "det_x") == []
