"""The base of this project's TFDS builders (captioned_shapes, moving_shapes, a local folder's images or clips):
datasets made on this machine, whose dataset info is never on TFDS's GCS bucket.

TFDS looks for an unprepared dataset's info there whenever its builder is made (DatasetInfo.initialize_from_bucket),
and first makes a temporary directory to copy it into, which it leaves behind, empty, when GCS has none or is off:
one /tmp/tmp*tfds per builder made. These builders do not look."""

import tensorflow_datasets as tfds


class LocalDatasetInfo(tfds.core.DatasetInfo):
  def initialize_from_bucket(self) -> None:
    """Nothing to read: the dataset is generated here."""


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  def dataset_info_from_configs(self, **kwargs) -> LocalDatasetInfo:
    """The builder's DatasetInfo of `kwargs` (features, description); no metadata files sit beside these builders."""
    return LocalDatasetInfo(builder=self, **kwargs)
