"""Sequence parallelism (mesh.sequence): a video model's frames, or Wan's tokens, split over devices. A train step
on a (data 2, sequence 4) mesh computes what it computes on (data 2), each device holding a fraction of the
activations; a sequence-parallel run scores its held-out loss and samples; what cannot be split is refused."""

import jax
import numpy as np
import pytest

from configs import t2i_shapes, t2v_moving_shapes
from diffusion_jax import config_checks, sharding, train
from diffusion_jax.data import pipeline
from diffusion_jax.metrics import heldout_loss
from diffusion_jax.models import text_to_image
from test_dit import sampled_clips
from test_wan_transformer import save_tiny_wan


def video_config(backbone: str, wan_dir):
  """t2v_moving_shapes:test (4 frames of 16 px) with a 2-block DiT or a tiny random Wan."""
  config = t2v_moving_shapes.get_config("test")
  config.train.batch_size = 2
  if backbone == "dit":
    config.model.update(backbone="dit", channels=16, depth=2, patch_size=2)
  elif backbone == "wan":
    save_tiny_wan(wan_dir)
    config.model.update(backbone="wan", wan_path=str(wan_dir))
    config.diffusion.update(path="flow", prediction="flow")
    config.data.image_fraction = 0.0
    config.text.t5.d_model = 32
    config.model.remat = True  # (as configs/wan_t2v.py: its FLOPs are counted on one device without the mesh)
  return config


def step_on(config, mesh_config, batch_np):
  """(state, metrics, per-device temporary bytes of the compiled step) of one train step on that mesh."""
  config = config.copy_and_resolve_references()
  config.mesh.update(mesh_config)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:np.prod(list(mesh_config.values()))])
  state, graphdef = train.init_state(config, mesh)
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch_np.items()}
  compiled, _ = train.compile_step(config, train.make_train_step(config, graphdef), state, shapes, mesh)
  state, metrics = compiled(state, pipeline.to_global(batch_np, sharding.batch_sharding(mesh)),
                            train.place_hparams(config, mesh))
  return state, metrics, compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("backbone", ["dit", "wan"])
def test_a_sequence_parallel_step_computes_the_data_parallel_one_with_less_memory_a_device(backbone, tmp_path):
  """The video DiT's frames (4 a clip, one a device; its temporal attention mixes frames across devices) and Wan's
  256 tokens a clip over 4 devices: the same loss and update as on 2 devices, and under half the temporary memory a
  device (measured: about a third). (The video U-Net's frames split the same way: one-off, README.)"""
  config = video_config(backbone, tmp_path / "wan")
  batch_np = pipeline.synthetic_batch(config)
  batch_np["video"] = np.random.default_rng(0).normal(size=batch_np["video"].shape).astype(np.float32)
  data_state, data_metrics, data_bytes = step_on(config, dict(data=2, fsdp=1, sequence=1, tensor=1), batch_np)
  state, metrics, sequence_bytes = step_on(config, dict(data=2, fsdp=1, sequence=4, tensor=1), batch_np)
  np.testing.assert_allclose(metrics["loss"], data_metrics["loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics["grad_norm"], data_metrics["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(jax.device_get(data_state.params))):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
  assert sequence_bytes < 0.5 * data_bytes
  if backbone == "dit":  # a run on that mesh scores its held-out loss and samples its clips there
    graphdef = text_to_image.split(text_to_image.abstract(config), config)[0]
    examples = {k: batch_np[k] for k in ("video", "text_ids", "text_mask")}
    losses = [heldout_loss.make_heldout_loss_fn(config, graphdef, sharding.make_mesh(mesh))(
        state.params, state.frozen, examples) for mesh in (dict(data=-1), dict(data=2, sequence=4))]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    config.mesh.update(data=2, fsdp=1, sequence=4, tensor=1)
    videos = sampled_clips(config, state, 1)
    assert videos.shape == (2, 1, 4, 16, 16, 3) and videos.dtype == np.uint8


def test_what_sequence_parallelism_cannot_split_is_refused(tmp_path):
  image = t2i_shapes.get_config("test")
  image.mesh.update(data=2, sequence=4)
  assert "mesh.sequence=4 splits a video model's frames over devices; an image model has none" in " ".join(
      config_checks.problems(image, device_count=8))
  config = video_config("dit", None)
  config.mesh.update(data=2, sequence=4)
  assert config_checks.problems(config, device_count=8) == []
  assert "mesh.sequence * mesh.tensor = 4 devices share each example, but a process has 2" in " ".join(
      config_checks.problems(config, device_count=8, process_count=4))
  config.model.update(video_attention="spacetime", temporal_patch_size=2)
  assert "data.frames=4: a clip's 2 tubelets of 2 frames must be a multiple of mesh.sequence=4" in " ".join(
      config_checks.problems(config, device_count=8))
  wan = video_config("wan", tmp_path / "wan")
  wan.mesh.update(data=1, sequence=8)
  wan.data.frames, wan.data.resolution = 3, 12  # 3 x 6 x 6 tokens
  assert "data.frames=3 makes 108 tokens a clip in Wan's transformer, which mesh.sequence=8 devices do not divide" \
         in " ".join(config_checks.problems(wan, device_count=8))
