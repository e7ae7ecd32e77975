"""The names the library's choices go by, in one torch-free module.

The command line builds its choices (Typer enums) from these, so that ``nrm-ood --help`` imports no
torch; the library modules take their constants from here too, so each name list exists once.
Importing ``nrm.names`` runs no other part of nrm (``nrm/__init__.py`` imports lazily).
"""

from __future__ import annotations

# Numeric precision of scoring (nrm.model): float32 throughout, autocast to bf16 / fp16, or float32
# storage with TF32 matmuls and convolutions on CUDA.
PRECISIONS = ("fp32", "bf16", "fp16", "tf32")
# Training precisions (nrm.training): fp16 would need loss scaling, so it is not offered.
TRAIN_PRECISIONS = ("fp32", "bf16", "tf32")
AUGMENTATIONS = ("none", "crop", "flip-crop")
OPTIMIZERS = ("adamw", "sgd")
# Estimators of log Z(y) (nrm.fit).
NORMALISERS = ("none", "class_mean", "harmonic")
# Architectures nrm.presets builds by name.
PRESETS = ("gray28", "gray28-flat", "rgb32-allconv", "rgb32-small", "digits8", "resnet-cifar")

# Per-sample score columns of NRM.score, in output order (nrm.scores); fitted columns follow them.
COLUMNS = ("pred", "max_softmax", "max_logit", "energy", "latent_prior_layers", "latent_prior", "latent_loglik",
           "recon_sq_error", "loglik_bound")
# The threshold score nrm.fit fits by default, and the column that ranks ood_score on a model without a
# fitted threshold (nrm.plan).
DEFAULT_THRESHOLD_SCORE = "latent_loglik"
# The detector registry (nrm.detectors) holds DETECTORS then POSTHOC, in this order.
# Detectors on the NRM's statistics (StatisticsDetector): each makes column det_<name>.
DETECTORS = ("typicality", "mahalanobis", "gmm", "mahalanobis_energy", "mahalanobis_energy_robust")
DETECTOR_PREFIX = "det_"
FEATURE_SETS = ("eta", "layers", "layers_recon", "channels", "channels_recon", "gates", "gates_recon", "gates_acts",
                "gates_channels_recon")
DEFAULT_DETECTOR = "mahalanobis"  # best mean worst-case validation AUROC over checkpoints (docs/results-detectors.md)
DEFAULT_FEATURES = "gates_acts"
# The field's post-hoc baselines on the penultimate features (BaselineDetector): each makes a column of its name.
POSTHOC = ("mahalanobis_feat", "knn", "vim")


def unknown_columns(columns: list[str]) -> list[str]:
    """The names in ``columns`` that no model makes: not in COLUMNS or POSTHOC and not det_<...>. What a
    given model makes is checked by nrm.plan.plan_for; this check needs no model (the command line's, at
    parse time)."""
    return [c for c in columns if c not in (*COLUMNS, *POSTHOC) and not c.startswith(DETECTOR_PREFIX)]
