"""What synthetic data is for: downstream tasks trained on real or synthetic folders."""

from medfusion.downstream.classifier import (
    ClassifierConfig,
    TensorClassDataset,
    build_classifier,
    classification_metrics,
    open_tstr_folders,
    predict,
    train_classifier,
    tstr,
)
from medfusion.downstream.classify import ClassifyConfig, check_private_model, parse_epsilons, run_classify
from medfusion.downstream.restoration import Corruption, RestorationConfig, dice_per_class

__all__ = [
    "ClassifierConfig",
    "ClassifyConfig",
    "Corruption",
    "RestorationConfig",
    "TensorClassDataset",
    "build_classifier",
    "check_private_model",
    "classification_metrics",
    "dice_per_class",
    "open_tstr_folders",
    "parse_epsilons",
    "predict",
    "run_classify",
    "train_classifier",
    "tstr",
]
