"""Data: grain pipelines over the embedded MNIST set, tensorflow-datasets image sets, and code datasets."""

from ctxrq_jax.data.codes import CodeDatasetWriter
from ctxrq_jax.data.codes import CodeMetadata
from ctxrq_jax.data.codes import load_codebook
from ctxrq_jax.data.codes import load_codes
from ctxrq_jax.data.codes import make_code_iterator
from ctxrq_jax.data.codes import read_metadata
from ctxrq_jax.data.images import dataset_info
from ctxrq_jax.data.images import make_image_iterator

__all__ = [
    "CodeDatasetWriter",
    "CodeMetadata",
    "dataset_info",
    "load_codebook",
    "load_codes",
    "make_code_iterator",
    "make_image_iterator",
    "read_metadata",
]
