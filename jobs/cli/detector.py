"""`nrm-ood fit-detector`: (re)fit the OOD detector of a checkpoint on its held-out training rows."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from jobs.cli.options import Decode, EndpointUrl, at_least, choice, fail, named_sets
from nrm import names

if TYPE_CHECKING:
    from torch import Tensor

    from nrm.model import NRM
    from nrm.runner import Runner

app = typer.Typer()


@app.command("fit-detector")
def fit_detector(
    model: Annotated[Path, typer.Option(help="Checkpoint directory to start from.")],
    data: Annotated[str, typer.Option(help="The model's in-distribution TRAIN Parquet (never the test split).")],
    out: Annotated[Path, typer.Option(help="Checkpoint directory to write (weights unchanged, same model_id).")],
    detector: Annotated[str | None, choice(names.DETECTORS, "Detector on the NRM statistics (nrm.detectors); "
                                           f"given alone, on the features {names.DEFAULT_FEATURES}.")] = None,
    features: Annotated[str | None, choice(names.FEATURE_SETS, "Feature set (nrm.detectors.features); given "
                                           f"alone, of the detector {names.DEFAULT_DETECTOR}.")] = None,
    seed: Annotated[int, typer.Option(help="Seed `nrm-ood train` used: its held-out rows are the ones used.")] = 0,
    val_fraction: Annotated[float, at_least(0, "Held-out fraction `nrm-ood train` used.", strict=True)] = 0.1,
    candidates: Annotated[bool, typer.Option(help="Also keep every other candidate detector as a det_* column.")] = False,
    val_ood: Annotated[list[str] | None, typer.Option(
        callback=named_sets("--val-ood"),
        help="NAME=PARQUET validation OOD set (repeatable; never a set you report on). With it, --detector and "
             "--features are not used: the candidate with the best worst-case validation AUROC wins.")] = None,
    val_ood_limit: Annotated[int, at_least(1, "Rows read of each --val-ood set.")] = 2000,
    endpoint_url: EndpointUrl = None,
    decode: Decode = names.DECODES[0],
    detector_rows: Annotated[int | None, at_least(1, "Fit the detector on this many training rows (not held out) "
        "instead of half the held-out rows; all held-out rows then set the threshold and make the choice. A "
        "Gaussian on thousands of gate features (ResNet-56: 4,064) needs more rows than a held-out half.")] = None,
    baselines: Annotated[bool, typer.Option(help="Also fit the field's post-hoc baselines (Mahalanobis on the penultimate features, KNN k=50, ViM: columns mahalanobis_feat, knn, vim) on the training rows that were not held out.")] = False,
) -> None:
    """(Re)fit a detector on an existing checkpoint and make it the checkpoint's threshold score. With none
    of --detector, --features, --detector-rows or --val-ood: the default rule (docs/study-default-detector.md)
    chooses the fitting rows, detector and features on patch-shuffled copies of the training rows. With
    --val-ood the detector is chosen on those validation OOD sets; otherwise the one asked for is fitted
    on half the rows `nrm-ood train` held out (same seed and fraction), or on --detector-rows training rows.
    Every choice's table is printed and saved."""
    import torch

    import nrm
    from jobs.datasets import DatasetError, load_images, load_labelled
    from jobs.evaluate import parse_ood
    from jobs.storage import StorageError, Store
    from nrm.fit import refit
    from nrm.runner import Runner
    from nrm.training import batches, held_out_split

    try:
        runner = Runner(nrm.load(model))  # scores its rows as the actors do (channels-last on a CPU)
        m = runner.model
        store = Store(endpoint_url)
        x, y = load_labelled(data, m.config.input, None, store, decode=decode)
        refit_rows, train_rows = held_out_split(len(x), val_fraction, torch.Generator().manual_seed(seed))
        if baselines:
            from nrm.fit import fit_posthoc

            fitted = fit_posthoc(runner, batches(m, torch.from_numpy(x), 512, train_rows), torch.from_numpy(y)[train_rows])
        images = torch.from_numpy(x)
        if detector is None and features is None and detector_rows is None and not val_ood:
            fitted_on = _default_rule(runner, images, refit_rows, train_rows, candidates)
        else:
            ood = {name: batches(m, torch.from_numpy(load_images(uri, m.config.input, val_ood_limit, store, decode=decode)), 512)
                   for name, uri in parse_ood(val_ood or [], "--val-ood").items()}
            fit_rows = train_rows[:detector_rows] if detector_rows else None
            refit(runner, batches(m, images, 512, refit_rows), detector or names.DEFAULT_DETECTOR,
                  features or names.DEFAULT_FEATURES, candidates=candidates, val_ood=ood or None,
                  fit_batches=batches(m, images, 512, fit_rows) if fit_rows is not None else None)
            fitted_on = (f"{len(fit_rows)} training rows" if fit_rows is not None
                         else f"half of {len(refit_rows)} held-out rows")
    except (nrm.CheckpointError, StorageError, DatasetError, ValueError) as e:
        raise fail(str(e)) from None
    _save_and_say(m, out, fitted_on)
    if baselines:
        typer.echo(f"fitted the post-hoc baselines {', '.join(d.column for d in fitted)} on {len(train_rows)} training rows")


def _save_and_say(m: NRM, out: Path, fitted_on: str) -> None:
    """Write the refitted checkpoint and print each choice's validation table and what was fitted."""
    import nrm

    mid = nrm.save(m, out)
    th, det = m.config.fitted.threshold, m.config.fitted.detector
    assert th is not None and det is not None and det.main is not None
    for column, row in det.selection.items():
        typer.echo(f"  validation AUROC {column}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items())
                   + f" (worst {min(row.values()):.3f})")
    typer.echo(f"fitted {det.main.name}[{det.main.features}] on {fitted_on}; threshold {th.score} < {th.value:.4g} "
               f"flags OOD; wrote {out} (model_id {mid[:12]})")


def _default_rule(runner: Runner, images: Tensor, held_rows: Tensor, train_rows: Tensor, candidates: bool) -> str:
    """fit-detector's default flow (nrm.detectors.default): the rule on the held-out and training rows
    of ``images`` (uint8, N x H x W x C), chosen on patch-shuffled copies of the last training rows, or
    its fixed candidate where the images cannot be cut into the patch grid. Says which and returns
    the rows the winner was fitted on, in words."""
    from nrm.detectors import default
    from nrm.fit import refit_default
    from nrm.synthetic import SyntheticError, transform
    from nrm.training import batches

    m = runner.model
    try:
        shuffled = transform(default.SYNTHETIC, images[train_rows[-default.SYNTHETIC_ROWS:]])
    except SyntheticError as e:
        typer.echo(f"no patch-shuffled validation set ({e}); the rule's fixed candidate is fitted")
        shuffled = None
    choice = refit_default(runner, batches(m, images, 512, held_rows), batches(m, images, 512, train_rows),
                           batches(m, shuffled, 512) if shuffled is not None else None, candidates=candidates)
    if shuffled is not None:
        typer.echo(f"the default rule chose on {len(shuffled)} patch-shuffled training rows (docs/study-default-detector.md)")
    n_train = len(train_rows)
    return {"half": f"half of {len(held_rows)} held-out rows", "train": f"{n_train} training rows",
            "train20k": f"{min(default.TRAIN_ROWS, n_train)} training rows"}[choice.rows]
