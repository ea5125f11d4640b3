"""Test session set-up: a simulated 8-device pod on the CPU (must precede any jax import)."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402  (after the environment is set)


def tiny_config(tmp_path_factory):
  """The seconds-long test variant of the main experiment, with its own dataset directory."""
  from configs import t2i_shapes

  config = t2i_shapes.get_config("test")
  config.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
  return config


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
  """A 4-step training run with checkpoints at 2 and 4: (config, workdir, final params).

  """
  import jax

  from diffusion_jax import train

  config = tiny_config(tmp_path_factory)
  workdir = tmp_path_factory.mktemp("workdir")
  state, _ = train.train_and_evaluate(config, workdir)
  return config, workdir, jax.device_get(state.params)


@pytest.fixture(scope="session")
def trained_video(trained, tmp_path_factory):
  """The t2v test config inflated from the `trained` image workdir, temporal layers only, 4 steps with
  joint image-video batches: (config, workdir, final state)."""
  from configs import t2v_moving_shapes
  from diffusion_jax import train

  config = t2v_moving_shapes.get_config("test")
  config.data.data_dir = str(tmp_path_factory.mktemp("tfds_video"))
  config.inflate.update(image_workdir=str(trained[1]), train_temporal_only=True)
  config.optimizer.learning_rate = 1e-2  # a few steps must visibly train the temporal layers
  workdir = tmp_path_factory.mktemp("workdir_video")
  state, _ = train.train_and_evaluate(config, workdir)
  return config, workdir, state
