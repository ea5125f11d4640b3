"""Editing a given image instead of generating from noise: image-to-image (SDEdit) and inpainting.

Image-to-image (Meng et al. 2022) noises the given image to the level `strength` of the way up the sampling
grid and runs the rest of the grid from there: strength 1 starts from pure noise, lower keeps more of the image.
Inpainting also keeps the region a mask marks as known: at every step the denoiser's clean estimate there is
replaced by the known image, so the sampler converges to it there and the generated region is denoised beside
it; the known region of the output is then the given image, exactly.

The noise an edit starts from (sample.edit_noise): "random", SDEdit's fresh Gaussian noise, or "inversion", DDIM
inversion (Song et al. 2021; the start of Mokady et al. 2023's editing): the deterministic sampler's ODE run
backwards from the given image up to the edit's start level with the unconditional model, so the rest of the
grid, run forward for the prompt, starts from noise that leads back to the image and keeps more of it. Or
"source_inversion": the same walk with the model conditioned on a source prompt, what the given image shows, which
guidance's other branch then reads in place of the null condition (Miyake et al. 2023's negative-prompt inversion,
a stand-in for Mokady et al.'s null-text inversion without its optimisation): under guidance the unconditional
walk no longer leads back to the image, while with the source prompt the guided step for the source prompt is
the walk's own, so the edit departs from the image only as far as the new prompt differs from the source.

A video model animates an image the same way (image-to-video): the clip to edit is the image repeated, and its
first frame is kept (the replacement method of Ho et al. 2022's conditional video generation).

All functions are pure. Shapes: images and estimates [batch, (frames,) h, w, c]; keep masks [batch, (frames,) h,
w, 1], 1 where the given image is kept, 0 where it is generated anew.
"""

import jax
import jax.numpy as jnp

from diffusion_jax import samplers

EDIT_NOISE = ("random", "inversion", "source_inversion")


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


def inverted(denoise_fn, x0, alpha, sigma):
  """DDIM inversion: x at the grid's noisiest level (alpha[0], sigma[0]) from which deterministic DDIM over the grid
  (alpha, sigma [steps + 1], noisiest first, as concrete arrays) leads back to x0 [batch, ...], found by running
  its steps backwards from the least noisy level, each step's clean estimate taken where the step starts. At a
  clean end (sigma 0) there is no noise to estimate: the walk starts from x0 at the next level, noise-free."""
  last = len(alpha) - (2 if float(sigma[-1]) == 0 else 1)  # the least noisy level the walk starts from
  levels = jnp.stack([alpha[1:last + 1], sigma[1:last + 1], alpha[:last], sigma[:last]], axis=-1)[::-1]

  def step(x, level):
    a_t, s_t, a_s, s_s = level
    estimate = denoise_fn(x, jnp.full(x.shape[:1], a_t), jnp.full(x.shape[:1], s_t))
    return samplers.ddim_step(x, estimate, a_t, s_t, a_s, s_s, 0.0, jnp.zeros_like(x)), None

  return jax.lax.scan(step, alpha[last] * x0, levels)[0]
