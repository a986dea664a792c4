r"""Evaluation: the CaloChallenge metrics (high-level features, separation power, classifier
AUC/JSD, FPD/KPD) and point-cloud-native ones, with plots and an HTML report.

``import calopc.eval`` is light; torch, scikit-learn and matplotlib load when a metric needs them.
"""

from __future__ import annotations

__all__ = [
    "METRICS",
    "ClassifierConfig",
    "ClassifierResult",
    "FeatureHist",
    "Features",
    "apply_threshold",
    "classifier_inputs",
    "classifier_metric",
    "compute_features",
    "evaluate",
    "feature_histograms",
    "fpd",
    "frechet_distance",
    "high_level_vector",
    "kpd",
    "load_sample",
    "separation_power",
]

from .classifier import ClassifierConfig, ClassifierResult, classifier_inputs, classifier_metric
from .distances import fpd, frechet_distance, kpd
from .evaluate import METRICS, evaluate
from .features import Features, apply_threshold, compute_features, high_level_vector
from .histograms import FeatureHist, feature_histograms, separation_power
from .samples import load_sample


def __dir__() -> list[str]:
    return sorted(__all__)
