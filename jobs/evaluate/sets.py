"""The sets `nrm-ood evaluate` measures: the options that name them, the --limit copies, and scoring
each set with the Ray job (or reusing its committed run)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from jobs import manifest
from jobs.filtering import FilterError, read_scores
from jobs.pipeline import Checkpoint, JobError, ScoreOptions, run_score
from jobs.storage import StorageError, Store, absolute

IN = "in"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
GROUPS = ("near", "far")  # OpenOOD's OOD groups, each a CLI option; --ood sets belong to none


class EvaluateError(RuntimeError):
    """The evaluation cannot proceed; the message is one clear sentence."""


def parse_ood(specs: list[str], option: str = "--ood") -> dict[str, str]:
    """``["NAME=URI", ...]`` -> {NAME: URI}, in order. Raises ValueError naming the bad entry (and ``option``)."""
    out: dict[str, str] = {}
    for s in specs:
        name, eq, uri = s.partition("=")
        name, uri = name.strip(), uri.strip()
        if not eq or not name or not uri:
            raise ValueError(f"{option} {s!r}: expected NAME=URI, e.g. {option} svhn=s3://bucket/svhn/test/")
        if not NAME.match(name):
            raise ValueError(f"{option} {s!r}: NAME {name!r} must be letters, digits, '_', '.', '-' "
                             "(starting with a letter or digit, at most 64 characters)")
        if name == IN:
            raise ValueError(f"{option} {s!r}: NAME {IN!r} is reserved for the in-distribution set")
        if name in out:
            raise ValueError(f"{option} {s!r}: NAME {name!r} is given twice")
        out[name] = uri
    return out


def group_sets(ood: dict[str, str], near: dict[str, str], far: dict[str, str]
               ) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Parsed --ood, --near, --far -> (every OOD set NAME -> URI: near, far, then ungrouped; the
    non-empty groups "near"/"far" -> NAMEs). A NAME given to two options is a ValueError naming both."""
    options = {"--near": near, "--far": far, "--ood": ood}
    sets: dict[str, str] = {}
    seen: dict[str, str] = {}
    for option, named in options.items():
        for name, uri in named.items():
            if name in seen:
                raise ValueError(f"{option} {name}={uri}: NAME {name!r} is also given to {seen[name]}; "
                                 "each OOD set needs its own NAME")
            seen[name] = option
            sets[name] = uri
    return sets, {g: list(named) for g, named in zip(GROUPS, (near, far), strict=True) if named}


@dataclass
class EvalOptions:
    model: str
    input: str
    ood: dict[str, str]  # NAME -> URI
    out: Path  # local directory: scores/, inputs/, metrics.*, report.html, figures/
    _: KW_ONLY
    limit: int | None = None
    batch_size: int = 512
    address: str | None = None
    endpoint_url: str | None = None
    groups: dict[str, list[str]] = field(default_factory=dict)  # "near"/"far" -> NAMEs of ood


@dataclass
class ScoredSet:
    """One scored set: its committed run and every output row of it."""

    name: str  # "in" or the OOD NAME
    run_id: str
    input: str  # what the user named
    table: pa.Table
    manifest: dict[str, Any] = field(default_factory=dict)
    limit: dict[str, Any] | None = None  # the --limit copy's record, when one was made
    group: str | None = None  # "near", "far" or None (ungrouped --ood set, or the in-distribution set)


@dataclass
class EvalResult:
    out: Path
    metrics: dict[str, Any]
    incomplete: list[str]  # sets whose run had unreadable input files

    @property
    def exit_code(self) -> int:
        return 3 if self.incomplete else 0


def run_id(name: str) -> str:
    return IN if name == IN else f"ood-{name}"


# ---------------------------------------------------------------------------- --limit copies
def limited_copy(store: Store, uri: str, n: int, dest: Path) -> dict[str, Any]:
    """Write the first ``n`` rows of ``uri`` (files sorted by URI, rows in order) to ``dest``."""
    try:
        files = store.list_parquet(uri)
    except StorageError as e:
        raise EvaluateError(str(e)) from None
    parts: list[pa.Table] = []
    used: list[str] = []
    failed: list[dict[str, str]] = []
    taken = 0
    for f in files:
        if taken >= n:
            break
        fs, path = store.filesystem(f.uri)
        try:
            with fs.open_input_file(path) as fh:
                pf = pq.ParquetFile(fh)
                for rg in range(pf.num_row_groups):
                    if taken >= n:
                        break
                    t = pf.read_row_group(rg)
                    t = t.slice(0, n - taken)
                    parts.append(t)
                    taken += t.num_rows
        except Exception as e:  # the scoring job would list it as a failed input; so does the copy
            failed.append({"uri": f.uri, "error": f"cannot read: {type(e).__name__}: {e}"})
            continue
        used.append(f.uri)
    if not parts:
        raise EvaluateError(f"no readable rows in {uri!r} to take --limit {n} from")
    try:
        table = pa.concat_tables(parts, promote_options="default")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise EvaluateError(f"the files of {uri!r} have different schemas and cannot be concatenated for "
                            f"--limit: {e}") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, dest, row_group_size=512)
    return {"source": uri, "limit": n, "rows": table.num_rows, "files": used, "failed_inputs": failed}


# ---------------------------------------------------------------------------- scoring
def score_sets(opts: EvalOptions, ckpt: Checkpoint, echo: Callable[[str], None] = print) -> list[ScoredSet]:
    """Score (or reuse) every set; returns them in order: in-distribution first, then --ood order."""
    store = Store(opts.endpoint_url)
    scores_root = str(opts.out / "scores")
    out: list[ScoredSet] = []
    for name, given in [(IN, opts.input), *opts.ood.items()]:
        rid = run_id(name)
        uri = absolute(given)
        committed = manifest.read(store, scores_root, rid)
        limit: dict[str, Any] | None = None
        source = uri
        if opts.limit is not None:
            dest = opts.out / "inputs" / f"{name}.parquet"
            record = opts.out / "inputs" / f"{name}.json"
            source = str(dest)
            if committed is not None:
                limit = json.loads(record.read_text()) if record.is_file() else None
                if limit is None or limit.get("source") != uri or limit.get("limit") != opts.limit:
                    made = (f"the first {limit.get('limit')} rows of {limit.get('source')!r}" if limit
                            else f"{committed.get('input')!r} without --limit")
                    raise EvaluateError(
                        f"{opts.out} already holds a committed run {rid!r} of {made}, not the first {opts.limit} "
                        f"rows of {uri!r}; use a fresh --out or delete {scores_root}/{rid}")
            else:
                limit = limited_copy(store, uri, opts.limit, dest)
                record.write_text(json.dumps(limit, indent=2) + "\n")
        if committed is not None:
            if committed.get("input") != source:
                raise EvaluateError(f"{opts.out} already holds a committed run {rid!r} of {committed.get('input')!r}, "
                                    f"not {source!r}; use a fresh --out or delete {scores_root}/{rid}")
            if committed["model"]["model_id"] != ckpt.model_id:
                raise EvaluateError(f"{opts.out} already holds a committed run {rid!r} made by model "
                                    f"{committed['model']['model_id'][:12]}, not {ckpt.model_id[:12]} ({opts.model}); "
                                    f"use a fresh --out or delete {scores_root}/{rid}")
            if committed["model"].get("config_sha256") != ckpt.config_sha256:
                raise EvaluateError(f"{opts.out} already holds a committed run {rid!r} made by the same weights "
                                    f"({ckpt.model_id[:12]}) with a different config.json (threshold or detector "
                                    f"refitted?); use a fresh --out or delete {scores_root}/{rid}")
            echo(f"set {name}: reusing committed run {rid} ({committed['rows']['in']} rows)")
        else:
            echo(f"set {name}: scoring {source}")
            try:
                res = run_score(ScoreOptions(model=opts.model, input=source, output=scores_root, run_id=rid, batch_size=opts.batch_size,
                                             address=opts.address, endpoint_url=opts.endpoint_url), echo=echo)
            except JobError as e:
                raise EvaluateError(f"set {name}: {e}") from None
            committed = res.manifest if res.status != "lost-commit-race" else manifest.read(store, scores_root, rid)
            if committed is None:
                raise EvaluateError(f"set {name}: run {rid} was not committed")
        try:
            table = read_scores(Store(), f"{scores_root}/{rid}")
        except FilterError as e:
            raise EvaluateError(f"set {name}: {e}") from None
        out.append(ScoredSet(name, rid, given, table, committed, limit))
    return out
