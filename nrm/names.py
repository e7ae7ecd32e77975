"""The names the library's choices go by, in one torch-free module.

The command line builds its choices (Typer enums) from these, so that ``nrm-ood --help`` imports no
torch; the library modules take their constants from here too, so each name list exists once.
Importing ``nrm.names`` runs no other part of nrm (``nrm/__init__.py`` imports lazily).
"""

from __future__ import annotations

# Numeric precision of scoring (nrm.model): float32 throughout, autocast to bf16 / fp16, or float32
# storage with TF32 matmuls and convolutions on CUDA.
PRECISIONS = ("fp32", "bf16", "fp16", "tf32")
# What a scoring run may ask for: a precision, or "auto" (nrm.precision.resolve: bf16 where the device
# computes in it fast, else fp32).
AUTO_PRECISION = "auto"
RUN_PRECISIONS = (*PRECISIONS, AUTO_PRECISION)
# Training precisions (nrm.training): fp16 would need loss scaling, so it is not offered.
TRAIN_PRECISIONS = ("fp32", "bf16", "tf32")
AUGMENTATIONS = ("none", "crop", "flip-crop")
OPTIMIZERS = ("adamw", "sgd")
# Estimators of log Z(y) (nrm.fit).
NORMALISERS = ("none", "class_mean", "harmonic")
# How the model's own preprocessing resizes (nrm.config.InputSpec.interpolation), as torchvision's
# InterpolationMode names them; the first is the default.
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
# Standard preprocessing by name (nrm-ood convert --preset): the shorter side resized to ``resize``
# (aspect ratio kept), the centre ``crop`` (height, width) taken, then normalised with mean and std.
INPUT_PRESETS: dict[str, dict[str, object]] = {
    # torchvision's ImageNet classifiers' weights.transforms() (and timm's at crop_pct 0.875)
    "imagenet": {"resize": 256, "crop": (224, 224), "interpolation": "bilinear",
                 "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
}
# How the job decodes JPEGs (jobs.images): exact full-scale decoding, or fast: libjpeg's DCT scaling
# (Pillow's draft) to no less than the resize target before resizing, which changes pixels slightly.
DECODES = ("exact", "fast")
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
