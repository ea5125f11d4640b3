"""Inflation (Make-A-Video): a video model initialised from a trained image model's checkpoint.

Every parameter of the image model (U-Net or DiT spatial layers and text encoder) is restored into the same
path of the video model, placed directly with the video model's shardings; the video model's temporal
layers keep their identity initialisation and its frame-index embedding is zeroed, so at step 0 the
video model produces, per frame, exactly what the image model produces (a spacetime DiT,
model.video_attention='spacetime', has no temporal layers: its inflated blocks attend across frames from the
start, and only its stills are the image model's output). Both models must have the same backbone and tokenize
text the same way.
A video model with pixel coordinate inputs (`model.coordinate_channels`) inflates from an image model without
them: the first convolution's weights for the coordinates start at zero, which keeps that identity.
A spacetime DiT whose tokens span several frames (`model.temporal_patch_size` t) takes the image DiT's patch
embedding averaged over a token's t frames and its output projection repeated for each of them (I3D's
inflation), so a token of t equal frames is the image model's token, and a still its output per frame.
"""

import jax
import jax.numpy as jnp
from flax import traverse_util

from diffusion_jax import checkpoint, finetune


INPUT_KERNEL = ("unet", "conv_in", "kernel")  # [3, 3, in_channels, channels]; coordinates are the last inputs
# The DiT's patch projections: (the axis that holds a patch's values, t times longer for t-frame tokens; whether the
# image weights are averaged over the t frames, as the input projection's are, or repeated for each).
TUBELET_AXES = {("dit", "patch_in", "kernel"): (0, True), ("dit", "patch_out", "kernel"): (1, False),
                ("dit", "patch_out", "bias"): (0, False)}


def _added_input_channels(image_config, video_config) -> int:
  """Input channels (pixel coordinates) that the video U-Net's first convolution has beyond the image U-Net's."""
  return 2 * (int(video_config.model.coordinate_channels) - int(image_config.model.coordinate_channels))


def compatibility_problems(image_config, video_config) -> list[str]:
  """Why the image model's weights cannot initialise the video model (empty when they can)."""
  found = finetune.text_problems(image_config, video_config)
  if image_config.model.backbone != video_config.model.backbone:
    found.append(f"model.backbone differs ({image_config.model.backbone!r} vs {video_config.model.backbone!r})")
  elif (image_config.model.backbone == "dit"
        and image_config.model.position_max_period != video_config.model.position_max_period):
    found.append(f"model.position_max_period differs ({image_config.model.position_max_period} vs "
                 f"{video_config.model.position_max_period}): the image DiT learned other patch positions")
  if bool(image_config.latent.autoencoder_path) != bool(video_config.latent.autoencoder_path):
    found.append("one model diffuses latents (latent.autoencoder_path) and the other pixels")
  if image_config.model.lowres_conditioning != video_config.model.lowres_conditioning:
    found.append("model.lowres_conditioning differs")
  added = _added_input_channels(image_config, video_config)
  if added < 0:
    found.append("the image model has model.coordinate_channels and the video model does not")
  elif added and video_config.inflate.train_temporal_only:
    found.append("the video model's coordinate channels would stay unused (their input weights start at zero "
                 "and inflate.train_temporal_only freezes them): set model.coordinate_channels=False or "
                 "inflate.train_temporal_only=False")
  return found


def load_image_weights(video_config, video_abstract: dict) -> dict:
  """{path: jax.Array} of the image checkpoint named by video_config.inflate, each placed with the video
  parameter's sharding at that path. video_abstract: {path: ShapeDtypeStruct with sharding} of every
  parameter of the video model (trainable and frozen)."""
  c = video_config.inflate
  image_config = checkpoint.read_config(c.image_workdir)
  problems = compatibility_problems(image_config, video_config)
  if problems:
    raise ValueError(f"inflate.image_workdir={c.image_workdir!r} cannot initialise this video model: "
                     + "; ".join(problems) + ".")
  image_params, image_frozen = finetune.abstract_parameters(image_config)

  added = _added_input_channels(image_config, video_config)
  tubelet = video_config.model.temporal_patch_size if video_config.model.backbone == "dit" else 1
  mismatched = []
  for path, leaf in (image_params | image_frozen).items():
    name = "/".join(map(str, path))
    video_shape = tuple(video_abstract[path].shape) if path in video_abstract else None
    if path == INPUT_KERNEL and video_shape is not None:
      video_shape = video_shape[:2] + (video_shape[2] - added,) + video_shape[3:]
    if path in TUBELET_AXES and video_shape is not None:
      axis, _ = TUBELET_AXES[path]
      video_shape = video_shape[:axis] + (video_shape[axis] // tubelet,) + video_shape[axis + 1:]
    if video_shape is None:
      mismatched.append(f"{name} is not in the video model")
    elif tuple(leaf.shape) != video_shape:
      mismatched.append(f"{name} has shape {tuple(leaf.shape)} in the image model, "
                        f"{tuple(video_abstract[path].shape)} in the video model")
  if mismatched:
    raise ValueError(f"The image model in {c.image_workdir!r} does not match the video model's spatial layers: "
                     + "; ".join(mismatched[:5]) + (" ..." if len(mismatched) > 5 else "") + ".")
  weights = checkpoint.restore_weights(c.image_workdir, c.step, c.use_ema,
                                       finetune.placed(image_params, video_abstract),
                                       finetune.placed(image_frozen, video_abstract), "inflate.image_workdir")
  if added:
    zero_extend = lambda kernel: jnp.pad(kernel, ((0, 0), (0, 0), (0, added), (0, 0)))
    weights[INPUT_KERNEL] = jax.jit(zero_extend, out_shardings=video_abstract[INPUT_KERNEL].sharding)(
        weights[INPUT_KERNEL])
  if tubelet > 1:
    for path, (axis, averaged) in TUBELET_AXES.items():
      weights[path] = jax.jit(lambda w, axis=axis, averaged=averaged: tubelet_weight(w, axis, tubelet, averaged),
                              out_shardings=video_abstract[path].sharding)(weights[path])
  return weights


def tubelet_weight(weight, axis: int, frames: int, averaged: bool):
  """An image DiT's patch projection weight for tokens of `frames` frames: repeated along `axis` for each frame,
  and divided by their number if `averaged` (an input projection: a still's tubelet then embeds as its image)."""
  reps = [1] * weight.ndim
  reps[axis] = frames
  tiled = jnp.tile(weight, reps)
  return tiled / frames if averaged else tiled


def inflate(weights: dict, params: dict, frozen: dict) -> tuple[dict, dict]:
  """(params, frozen) pure dicts of a freshly initialised video model -> the same with every parameter of
  `weights` (load_image_weights) put in its place and the frame-index embedding zeroed (it starts random in a
  model trained from scratch); the other temporal layers are untouched."""
  start = lambda p, x: x * 0 if "temporal_frame_embed" in p else weights.get(p, x)
  replace = lambda flat: traverse_util.unflatten_dict({p: start(p, x) for p, x in flat.items()})
  return replace(traverse_util.flatten_dict(params)), replace(traverse_util.flatten_dict(frozen))
