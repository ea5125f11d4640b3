"""Super-resolution conditioning for cascade stages: the low-resolution input and its noise augmentation.

An SR stage is trained on the same data as the base model; its low-resolution input is made on the fly
by downsampling the training image (or every frame of a video). That input is always an RGB image (the stage
below's output), also for a latent stage (latent.autoencoder_path, as Stable Diffusion's x4 upscaler), which
diffuses the autoencoder's latents of the high-resolution image and reads the low-resolution image resized to
its latent grid. Noise-conditioning augmentation
(Imagen, Cascaded Diffusion Models) diffuses that input to a random time t_aug ~ U[0, aug_max] of the
stage's own log-SNR schedule and gives the network the corresponding log-SNR, so at sampling time the
stage tolerates the artefacts of the stage below; there t_aug is a chosen constant (`sample.aug_level`).
A video stage can also be a temporal super-resolution stage (Imagen Video): its input has
`superres.lowres_frames` frames (every k-th frame), repeated up to the stage's frame count by the U-Net.
With `superres.residual` the stage diffuses the residual over its upsampled clean input, scaled by
1 / superres.residual_scale, instead of the image (as SRDiff does): what bicubic upsampling already gives
is free, and the network learns only the missing detail.
Pure functions of arrays. Shapes: x [batch, h, w, c] or [batch, frames, h, w, c].
"""

import jax
import jax.numpy as jnp

from diffusion_jax import objectives, schedules

LOWRES_CHANNELS = 3  # the low-resolution input is an RGB image


def downsample(x, resolution: int):
  """Antialiased bilinear (triangle-filter) downsampling of the two spatial axes to resolution x resolution."""
  if x.shape[-2] == resolution:
    return x
  shape = x.shape[:-3] + (resolution, resolution, x.shape[-1])
  return jax.image.resize(x, shape, "linear", antialias=True)


def subsample_frames(video, frames: int):
  """Every (f / frames)-th frame of video [batch, f, h, w, c]: the input of a temporal super-resolution
  (frame interpolation) stage."""
  return video[:, ::video.shape[1] // frames]


def lowres_input(x0, config):
  """The clean low-resolution input of an SR stage: fewer frames (temporal SR) and/or fewer pixels."""
  if config.superres.lowres_frames:
    x0 = subsample_frames(x0, config.superres.lowres_frames)
  return downsample(x0, config.superres.lowres_resolution)


def augment(lowres, aug_time, eps, logsnr_fn, path: str = "vp"):
  """(noisy low-res input, its log-SNR [batch]): lowres diffused with noise eps to time aug_time [batch].

  Time 0 is returned exactly clean, with the log-SNR of t = 0 as the condition."""
  aug_logsnr = logsnr_fn(aug_time)
  alpha, sigma = schedules.alpha_sigma_from_logsnr(aug_logsnr, path)
  clean = objectives.per_example(aug_time == 0, lowres)
  return jnp.where(clean, lowres, objectives.diffuse(lowres, eps, alpha, sigma)), aug_logsnr


def _logsnr_fn(config):
  return schedules.logsnr_schedule(config.diffusion.schedule, **config.diffusion.schedule_params)


def training_condition(lowres, key, config):
  """What an SR stage is conditioned on while training, from its clean low-res input (lowres_input): (noisy
  low-res input, aug log-SNR [batch])."""
  k_time, k_noise = jax.random.split(key)
  aug_time = jax.random.uniform(k_time, (lowres.shape[0],), maxval=config.superres.aug_max)
  eps = jax.random.normal(k_noise, lowres.shape, lowres.dtype)
  return augment(lowres, aug_time, eps, _logsnr_fn(config), config.diffusion.path)


def sampling_condition(lowres, keys, config, aug_level: float):
  """The condition at sampling time: lowres (from the stage below) at the fixed augmentation time, with
  each example's noise from its own key (keys [batch, 2]), so it does not depend on the batch."""
  eps = jax.vmap(lambda k: jax.random.normal(k, lowres.shape[1:], lowres.dtype))(keys)
  return augment(lowres, jnp.full((lowres.shape[0],), aug_level), eps, _logsnr_fn(config), config.diffusion.path)


def is_residual(config) -> bool:
  """Whether the stage diffuses residuals (workdirs from before the option have no such field)."""
  return bool(config.superres.get("residual", False))


def upsampled(lowres, shape):
  """The low-res input at the spatial size (and frame count) of `shape` [batch, (frames,) h, w, any channels]:
  frames repeated (temporal SR), pixels bicubic, as the U-Net and DiT read their condition."""
  if len(shape) == 5 and lowres.shape[1] != shape[1]:
    lowres = jnp.repeat(lowres, shape[1] // lowres.shape[1], axis=1)
  return jax.image.resize(lowres, tuple(shape[:-1]) + lowres.shape[-1:], "bicubic")


def to_residual(x, lowres, config):
  """Image (or video) -> what a residual stage diffuses: (x - upsampled clean input) / residual_scale."""
  return (x - upsampled(lowres, x.shape)) / config.superres.residual_scale


def from_residual(residual, lowres, config):
  return residual * config.superres.residual_scale + upsampled(lowres, residual.shape)
