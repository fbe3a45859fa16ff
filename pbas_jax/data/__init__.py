"""Datasets: TFDS builders (MVTec AD, VisA, MPDD, users' folders), preprocessing, batching."""
from pbas_jax.data.builders import classes
from pbas_jax.data.builders import DATASETS
from pbas_jax.data.builders import prepare
from pbas_jax.data.loader import batches
from pbas_jax.data.loader import load_split
from pbas_jax.data.loader import Source
from pbas_jax.data.loader import subsample_indices
from pbas_jax.data.preprocess import DatasetError
from pbas_jax.data.preprocess import DatasetNotFoundError
from pbas_jax.data.preprocess import load_image
