"""fusion-engine first-party plugin: datasets.

Written exactly as a third-party plugin would be: it uses only ``fusion_engine``'s public API.

- ``sklearn-digits``: scikit-learn's bundled 8x8 digits, so a first run needs no download.
- ``imagefolder``: ``root/<class>/<image>``, or ``root/{train,val,test}/<class>/<image>`` for a
  dataset that brings its own split.
- ``csv``: a manifest of image paths, labels and, optionally, each sample's split.
- ``hf``: a Hugging Face dataset, from the hub's cache or local parquet files
  (``pip install 'fusion-engine[hf]'``).
"""

from __future__ import annotations

from fusion_engine import DatasetRecord, hookimpl

from .digits import DigitsParams, load_digits_dataset
from .folder import ImageFolderParams, load_image_folder
from .hf import HFParams, load_hf_dataset
from .manifest import CsvParams, load_csv_manifest


@hookimpl
def register_datasets():
    return [
        DatasetRecord(
            name="sklearn-digits",
            load=load_digits_dataset,
            params=DigitsParams,
            description="scikit-learn's bundled handwritten digits: 1797 8x8 grayscale images, 10 classes",
        ),
        DatasetRecord(
            name="imagefolder",
            load=load_image_folder,
            params=ImageFolderParams,
            description="root/<class>/<image>, or root/{train,val,test}/<class>/<image> with its own split",
        ),
        DatasetRecord(
            name="csv",
            load=load_csv_manifest,
            params=CsvParams,
            description="a CSV manifest of image paths and class names, optionally with a split column",
        ),
        DatasetRecord(
            name="hf",
            load=load_hf_dataset,
            params=HFParams,
            description="a Hugging Face dataset: a hub name (from its cache) or local parquet files",
        ),
    ]
