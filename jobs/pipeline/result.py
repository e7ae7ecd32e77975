"""What a scoring run ended in (``RunResult``) and the lines the command line prints about it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunResult:
    run_id: str
    status: str  # "complete" | "incomplete" | "already-committed" | "nothing-to-do" | "lost-commit-race"
    manifest: dict[str, Any] = field(default_factory=dict)
    manifest_uri: str = ""
    timings: dict[str, float] = field(default_factory=dict)  # plan_s, score_s, commit_s (driver wall time)

    @property
    def exit_code(self) -> int:
        return {"complete": 0, "already-committed": 0, "nothing-to-do": 0, "incomplete": 3,
                "lost-commit-race": 4}[self.status]


def summary(result: RunResult) -> str:
    m = result.manifest
    if result.status == "already-committed":
        failed = m.get("input_files", {}).get("failed", len(m.get("failed_inputs", [])))
        how = f"{m['status']}: {failed} input file(s) failed" if m.get("status") == "incomplete" else m.get("status")
        return (f"run {result.run_id} is already committed ({how}; {result.manifest_uri}); nothing to do"
                + ("; score again under a new --run-id to retry the failed inputs" if m.get("status") == "incomplete"
                   else ""))
    if result.status == "nothing-to-do":
        return "every input file is covered by a committed run; nothing to score"
    rows, t, ad = m["rows"], m["timings"], m["adapted"]
    lines = [
        f"run {result.run_id}: {result.status}",
        f"  rows {rows['in']}  ok {rows['ok']}  errors {rows['error']}  flagged OOD {m['flagged_ood']}"
        + (f" ({m['flagged_ood'] / rows['ok']:.1%} of ok)" if rows["ok"] else ""),
        f"  {t['seconds']:.1f} s (plan {t['plan_s']:.1f}, score {t['score_s']:.1f}), {t['images_per_s'] or 0:.0f} images/s"
        + (f"; {m['resumed_rows']} rows kept from an earlier attempt" if m.get("resumed_rows") else ""),
    ]
    if "drift" in m:
        lines.append(f"  drift: {m['drift']['line']}")
    if ad["converted"] or ad["resized"]:
        lines.append(f"  --resize-policy {ad['policy']}: {ad['converted']} row(s) colour-converted, "
                     f"{ad['resized']} resized to the model's input")
    for f in m.get("failed_inputs", []):
        lines.append(f"  failed input {f['uri']}: {f['error']}")
    if m["input_files"]["failed"] > len(m.get("failed_inputs", [])):
        lines.append(f"  ... {m['input_files']['failed']} failed input files in all (listed in {m['inputs']['uri']})")
    if result.status == "lost-commit-race":
        lines.append(f"  another run committed run id {result.run_id} first; this run's output was discarded")
    else:
        lines.append(f"  manifest {result.manifest_uri}")
    return "\n".join(lines)
