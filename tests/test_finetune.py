"""Fine-tuning: a run that starts from another run's weights (finetune.workdir)."""

import jax
import numpy as np
import pytest

from diffusion_jax import config_checks, sample, sharding, train
from conftest import tiny_config


def leaves(tree):
  return jax.tree.leaves(jax.device_get(tree))


def test_a_finetune_starts_from_the_other_runs_weights_at_another_resolution(trained, tmp_path_factory):
  """Every weight (trainable and frozen) is the other run's first EMA copy, on an FSDP mesh and at twice the
  resolution (progressive resolution training); the step, optimizer moments and EMA start afresh. (A fine-tune
  trains end to end in the LoRA test below; a resume restores its own checkpoint without initialising, as
  test_video's inflated run shows.)"""
  _, workdir, _ = trained
  _, source, _, step, _ = sample.load_checkpoint(workdir, use_ema=True)
  config = tiny_config(tmp_path_factory)
  config.data.resolution = 32
  config.optimizer.learning_rate = 3e-4
  config.mesh = dict(data=2, fsdp=4, tensor=1)
  config.finetune.workdir = str(workdir)
  assert not config_checks.problems(config)
  state, _ = train.init_state(config, sharding.make_mesh(config.mesh))
  for ours, theirs in zip(leaves((state.params, state.frozen)), leaves((source.params, source.frozen))):
    np.testing.assert_array_equal(ours, theirs)
  for copy in state.ema:
    for ours, theirs in zip(leaves(copy), leaves(source.params)):
      np.testing.assert_array_equal(ours, theirs)
  assert int(state.step) == 0 and int(step) == 4
  assert all(np.all(moment == 0) for moment in leaves(state.opt_state) if moment.ndim > 0)

  config.finetune.use_ema = False  # the trained weights instead
  state, _ = train.init_state(config, sharding.make_mesh(config.mesh))
  for ours, theirs in zip(leaves(state.params), leaves(sample.load_checkpoint(workdir, use_ema=False)[1].params)):
    np.testing.assert_array_equal(ours, theirs)


def test_a_finetune_of_another_model_is_refused_before_anything_is_read(trained, tmp_path_factory):
  _, workdir, _ = trained
  config = tiny_config(tmp_path_factory)
  config.finetune.workdir = str(workdir)
  config.model.channels = 32
  with pytest.raises(ValueError, match=r"The model in finetune.workdir=.* does not match this one: .*has shape "
                                       r".* there, .* here.*\(its config differs in: model.channels: 16 -> 32"):
    train.init_state(config, sharding.make_mesh(config.mesh))
  config = tiny_config(tmp_path_factory)
  config.finetune.update(workdir=str(workdir), step=3)
  with pytest.raises(ValueError, match=r"finetune.workdir=.* has no checkpoint at step 3 \(available: \[2, 4\]\)"):
    train.init_state(config, sharding.make_mesh(config.mesh))
  config.inflate.image_workdir = str(workdir)
  assert any("finetune.workdir and inflate.image_workdir both" in p for p in config_checks.problems(config))
