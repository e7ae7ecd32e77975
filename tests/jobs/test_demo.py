"""The README's main command, `nrm-ood demo`, end to end on embedded Ray (fewer epochs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.demo import run


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
