"""Reading, checking, transforming and writing medical images and volumes (2D and 3D)."""

from medfusion.data.dataset import DatasetSubset, ImageFolderDataset, build_transform, split_indices
from medfusion.data.discovery import Discovery, Sample, discover, load_class_names, save_class_names
from medfusion.data.errors import DataError, ImageReadError, Problem
from medfusion.data.fitting import describe_training_data, fit_normalization, training_geometry
from medfusion.data.image import ImageInfo, MedicalImage
from medfusion.data.inspect import InspectionReport, inspect_dataset
from medfusion.data.readers import MAX_PIXELS_ENV, max_pixels, read_image, read_info
from medfusion.data.transforms import Compose, CropOrPad, NormalizeIntensity, RandomFlip, Resample, Resize
from medfusion.data.writers import to_unsigned, write_image

__all__ = [
    "MAX_PIXELS_ENV",
    "Compose",
    "CropOrPad",
    "DataError",
    "DatasetSubset",
    "Discovery",
    "ImageFolderDataset",
    "ImageInfo",
    "ImageReadError",
    "InspectionReport",
    "MedicalImage",
    "NormalizeIntensity",
    "Problem",
    "RandomFlip",
    "Resample",
    "Resize",
    "Sample",
    "build_transform",
    "describe_training_data",
    "discover",
    "fit_normalization",
    "inspect_dataset",
    "load_class_names",
    "max_pixels",
    "read_image",
    "read_info",
    "save_class_names",
    "split_indices",
    "to_unsigned",
    "training_geometry",
    "write_image",
]
