"""The base of this project's TFDS builders (captioned_shapes, moving_shapes, a local folder's images or clips):
datasets made on this machine, whose dataset info is never on TFDS's GCS bucket.

TFDS looks for an unprepared dataset's info there whenever its builder is made (DatasetInfo.initialize_from_bucket),
and first makes a temporary directory to copy it into, which it leaves behind, empty, when GCS has none or is off:
one /tmp/tmp*tfds per builder made. These builders do not look."""

import logging

import tensorflow_datasets as tfds

from diffusion_jax import cli

# TFDS's warnings of what these builders are: each one's config made for its dataset ("custom"), and images decoded
# with PIL (OpenCV, which TFDS prefers, is no dependency here)
TFDS_NOTICES = cli.DroppedNotices(
    "Using custom data configuration: %s",
    "OpenCV is not installed. We recommend using OpenCV because it is faster according to our benchmarks. Defaulting "
    "to PIL to decode images...")


class LocalDatasetInfo(tfds.core.DatasetInfo):
  def initialize_from_bucket(self) -> None:
    """Nothing to read: the dataset is generated here."""


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  def __init__(self, *args, **kwargs):
    logging.getLogger("absl").addFilter(TFDS_NOTICES)  # (added once)
    super().__init__(*args, **kwargs)

  def dataset_info_from_configs(self, **kwargs) -> LocalDatasetInfo:
    """The builder's DatasetInfo of `kwargs` (features, description); no metadata files sit beside these builders."""
    return LocalDatasetInfo(builder=self, **kwargs)
