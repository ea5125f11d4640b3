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
the walk's own, so the edit departs from the image only as far as the new prompt differs from the source. Or
"null_text_inversion" (Mokady et al. 2023): source inversion's path, then for each step of the grid guidance's
other branch gets its own text, optimised (`optimised_nulls`, from the source prompt's encoding: our null
condition is a fully masked text, which has nothing to optimise) until the guided step for the source prompt
lands on the path; the edit then samples the new prompt with those texts, step by step. What it corrects is the
inversion's own error, which source inversion leaves.

A video model animates an image the same way (image-to-video): the clip to edit is the image repeated, and its
first frame is kept (the replacement method of Ho et al. 2022's conditional video generation).

All functions are pure. Shapes: images and estimates [batch, (frames,) h, w, c]; keep masks [batch, (frames,) h,
w, 1], 1 where the given image is kept, 0 where it is generated anew.
"""

import jax
import jax.numpy as jnp
import optax

from diffusion_jax import samplers

EDIT_NOISE = ("random", "inversion", "source_inversion", "null_text_inversion")
SOURCE_PROMPTED = ("source_inversion", "null_text_inversion")  # what edits starting from these read a source prompt


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


def keep_at(keep, size: tuple[int, int], frames: int | None = None):
  """A keep mask [..., H, W, 1] at size = (h, w) (a latent model's latent grid; H, W multiples of h, w): a cell is
  kept only when every pixel it covers is. With `frames`, a clip's mask [batch, T, H, W, 1] at that many latent
  frames of a causal autoencoder too (the first latent frame holds the first frame, each other one
  (T - 1) / (frames - 1) frames): kept only when all of them are."""
  *lead, height, width, _ = keep.shape
  rows, columns = size
  blocks = keep.reshape(*lead, rows, height // rows, columns, width // columns, 1).min(axis=(-4, -2))
  if frames is None or frames == keep.shape[1]:
    return blocks
  rest = blocks[:, 1:].reshape((keep.shape[0], frames - 1, -1) + blocks.shape[2:]).min(axis=2)
  return jnp.concatenate([blocks[:, :1], rest], axis=1)


def training_keep_masks(key, shape: tuple[int, int, int], whole: float = 0.25):
  """Keep masks float32 [batch, h, w, 1] (shape: (batch, h, w)) for training an inpainting model: a quarter (`whole`)
  of the images generated whole (0 everywhere, text-to-image), the others with one random rectangle generated
  anew (each side a uniform fraction of the image's, up to all of it, placed uniformly) and the rest kept."""
  batch, height, width = shape
  k_whole, k_size, k_place = jax.random.split(key, 3)
  size = jax.random.uniform(k_size, (batch, 2), minval=0.1, maxval=1.0) * jnp.array([height, width])
  corner = jax.random.uniform(k_place, (batch, 2)) * (jnp.array([height, width]) - size)
  rows, columns = jnp.arange(height)[None, :, None], jnp.arange(width)[None, None, :]
  inside = ((rows >= corner[:, :1, None]) & (rows < (corner + size)[:, :1, None]) &
            (columns >= corner[:, 1:, None]) & (columns < (corner + size)[:, 1:, None]))
  generated = inside | jax.random.bernoulli(k_whole, whole, (batch,))[:, None, None]
  return (1.0 - generated.astype(jnp.float32))[..., None]


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


def inversion_path(denoise_fn, x0, alpha, sigma):
  """DDIM inversion (Song et al. 2021): x at every level of the grid (alpha, sigma [steps + 1], noisiest first, as
  concrete arrays) -> [steps + 1, batch, ...], noisiest first, on the path deterministic DDIM over the grid walks
  back to x0 [batch, ...]: its steps run backwards from the least noisy level, each step's clean estimate taken
  where the step starts. At a clean end (sigma 0) there is no noise to estimate: the walk starts from x0 at the
  next level, noise-free, and the path ends at x0."""
  clean = float(sigma[-1]) == 0
  last = len(alpha) - (2 if clean else 1)  # the least noisy level the walk starts from
  levels = jnp.stack([alpha[1:last + 1], sigma[1:last + 1], alpha[:last], sigma[:last]], axis=-1)[::-1]

  def step(x, level):
    a_t, s_t, a_s, s_s = level
    estimate = denoise_fn(x, jnp.full(x.shape[:1], a_t), jnp.full(x.shape[:1], s_t))
    x = samplers.ddim_step(x, estimate, a_t, s_t, a_s, s_s, 0.0, jnp.zeros_like(x))
    return x, x

  start = alpha[last] * x0
  walked = jax.lax.scan(step, start, levels)[1]  # levels last - 1, ..., 0
  return jnp.concatenate([walked[::-1], start[None]] + ([x0[None]] if clean else []))


def inverted(denoise_fn, x0, alpha, sigma):
  """DDIM inversion: x at the grid's noisiest level (alpha[0], sigma[0]) from which deterministic DDIM over the grid
  leads back to x0 (inversion_path's first level)."""
  return inversion_path(denoise_fn, x0, alpha, sigma)[0]


def optimised_nulls(guided_step, path, null, iterations: int, learning_rate: float, on_step=None):
  """Null-text inversion (Mokady et al. 2023): guidance's unconditional text for each step of the grid, optimised
  so that the guided sampler retraces an inversion path.

  guided_step(x, null, i) -> x one deterministic step down the grid from level i, guided with `null`
  [batch, tokens, dim] as the unconditional branch's text. path [steps + 1, batch, ...]: inversion_path's levels,
  noisiest first. Step by step from path[0], the text (the previous step's, `null` at the first) takes
  `iterations` Adam steps of `learning_rate` on the squared distance between the step's result and path[i + 1],
  summed over each example (so an example's text depends on its own image alone), and the walk goes on from where
  the step with the optimised text lands. on_step(step index) is called on the host as each step starts
  (progress). -> texts [steps, batch, tokens, dim]."""
  optimizer = optax.adam(learning_rate)

  def distance(text, x, i, target):
    return jnp.sum(jnp.square(guided_step(x, text, i) - target))

  def per_step(carry, i):
    x, text = carry
    if on_step is not None:
      jax.debug.callback(on_step, i)

    def iterate(_, state):
      text, moments = state
      updates, moments = optimizer.update(jax.grad(distance)(text, x, i, path[i + 1]), moments)
      return optax.apply_updates(text, updates), moments

    text = jax.lax.fori_loop(0, iterations, iterate, (text, optimizer.init(text)))[0]
    return (guided_step(x, text, i), text), text

  return jax.lax.scan(per_step, (path[0], null), jnp.arange(len(path) - 1))[1]


def step_of(logsnr, grid_logsnr):
  """The index of the grid step [batch] each example's logsnr [batch] starts: the nearest of grid_logsnr [steps]."""
  return jnp.argmin(jnp.abs(grid_logsnr[None, :] - logsnr[:, None]), axis=1)
