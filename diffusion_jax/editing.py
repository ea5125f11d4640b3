"""Editing a given image instead of generating from noise: image-to-image (SDEdit) and inpainting.

Image-to-image (Meng et al. 2022) noises the given image to the level `strength` of the way up the sampling
grid and runs the rest of the grid from there: strength 1 starts from pure noise, lower keeps more of the image.
Inpainting also keeps the region a mask marks as known: at every step the denoiser's clean estimate there is
replaced by the known image, so the sampler converges to it there and the generated region is denoised beside
it; the known region of the output is then the given image, exactly.

A video model animates an image the same way (image-to-video): the clip to edit is the image repeated, and its
first frame is kept (the replacement method of Ho et al. 2022's conditional video generation).

All functions are pure. Shapes: images and estimates [batch, (frames,) h, w, c]; keep masks [batch, (frames,) h,
w, 1], 1 where the given image is kept, 0 where it is generated anew.
"""

import jax
import jax.numpy as jnp


def first_step(steps: int, strength: float) -> int:
  """Index into a sampling grid of `steps` steps where an edit at `strength` in (0, 1] starts: the last
  round-down(steps * strength) steps run (as diffusers' image-to-image pipelines count them)."""
  if not 0 < strength <= 1:
    raise ValueError(f"strength={strength} must be in (0, 1]")
  run = int(steps * strength)
  if run < 1:
    raise ValueError(f"strength={strength} of {steps} sampler steps runs none; raise the strength to at least "
                     f"{1 / steps:.3g} or the steps")
  return steps - run


def keep_at(keep, size: int):
  """A keep mask [..., H, W, 1] at `size` x `size` (a latent model's latent grid; H a multiple of size): a
  cell is kept only when every pixel it covers is."""
  *lead, height, width, _ = keep.shape
  blocks = keep.reshape(*lead, size, height // size, size, width // size, 1)
  return blocks.min(axis=(-4, -2))


def inpainting_denoiser(denoise_fn, known, keep, reconstruction_guidance: float = 0.0):
  """denoise_fn(x, alpha, sigma) -> clean estimate, with the estimate replaced by `known` where `keep` is 1.

  reconstruction_guidance w > 0 (Ho et al. 2022, Video Diffusion Models, eq. 7): the estimate of the generated
  region is first moved along - w * alpha / 2 * the gradient w.r.t. x of the squared error of the kept region's
  estimate, so it agrees with what is kept (a backward pass through the network at every step)."""

  def denoise(x, alpha, sigma):
    if not reconstruction_guidance:
      return jnp.where(keep > 0, known, denoise_fn(x, alpha, sigma))

    def error(x):
      estimate = denoise_fn(x, alpha, sigma)
      return jnp.sum(jnp.where(keep > 0, known - estimate, 0.0) ** 2), estimate

    gradient, estimate = jax.grad(error, has_aux=True)(x)
    scale = reconstruction_guidance * alpha.reshape(alpha.shape + (1,) * (x.ndim - 1)) / 2
    return jnp.where(keep > 0, known, estimate - scale * gradient)

  return denoise
