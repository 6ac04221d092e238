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

__all__ = [
    "ClassifierConfig",
    "TensorClassDataset",
    "build_classifier",
    "classification_metrics",
    "open_tstr_folders",
    "predict",
    "train_classifier",
    "tstr",
]
