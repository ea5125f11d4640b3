"""Train the KL autoencoder of latent diffusion (models/autoencoder.py) and write it as a diffusers directory.

  python -m diffusion_jax.train_autoencoder --config=configs/autoencoder_shapes.py \
      --workdir=workdirs/autoencoder_shapes [--config.key=value ...]

Flags:
  --config   autoencoder config file (optionally `file.py:variant`); every field can be overridden with
             --config.<field>=<value>; a mistyped field is an error
  --workdir  where checkpoints, logs, config.json and the trained autoencoder go; rerunning resumes from it
  --coordinator, --num_processes, --process_id, --auto_distributed
             a multi-process job, as the main job's (launch/ sets them: `launch/local.py
             --module=diffusion_jax.train_autoencoder -- FLAGS`)

Loss, per example (Rombach et al. 2022): the L1 error of the reconstruction of a posterior draw, summed over pixels,
plus lpips.loss_weight times its LPIPS from the input (metrics/lpips.py, weights from the local directory lpips.path)
counted once per pixel value (as SD adds it to every pixel's L1 error), plus train.kl_weight times the posterior's
KL divergence from N(0, I), summed over latent elements; averaged over the batch. With adversarial.weight > 0, from
step adversarial.start_step on, a PatchGAN discriminator (models/discriminator.py) trains on the same batches with
the hinge loss (the autoencoder's optimizer settings, its schedule counted from adversarial.start_step), and the
autoencoder's loss adds its generator loss -E[D(reconstruction)] times SD's adaptive weight, adversarial.weight *
||grad_W reconstruction loss|| / (||grad_W generator loss|| + 1e-4) clipped to [0, 1e4 * adversarial.weight], W the
decoder's last kernel. Video datasets train on their frames.

With autoencoder.temporal_decoder (a video dataset), the decoder is Stable Video Diffusion's temporal one
(models/autoencoder.py): the encoder still encodes each frame, the decoder decodes each training clip's latents
together, and the losses are the same, per frame; the written directory is a diffusers AutoencoderKLTemporalDecoder.
Its discriminator judges each frame alone, or with adversarial.temporal whole clips (3-D convolutions, as Video LDM's
and SVD's), and W is the kernel of its last layer, the 3x1x1 convolution (as sgm's VideoDecoder's).

With autoencoder.causal (a video dataset of 1 + 4 k frames), the autoencoder is HunyuanVideo's causal 3-D VAE
(models/causal_autoencoder.py): it encodes each training clip whole into 1 + k latent frames and decodes them
together; the losses are per frame, a clip's KL divergence shared evenly by its frames, W the kernel of the last
causal convolution; the written directory is a diffusers AutoencoderKLHunyuanVideo. Time is halved at the two
levels before the last, space at the first log2(autoencoder.spatial_compression_ratio) (0: 2^(levels - 1)).

train.init_from, a local diffusers autoencoder directory, starts the run from its weights (a run that resumes reads
its checkpoint instead): an autoencoder of the same layout (fine-tuning, e.g. SD's VAE on one's own data), or, for a
temporal decoder, an image autoencoder of the same widths, as SVD's temporal decoder started from an image one. The
temporal decoder then starts reconstructing every frame exactly as the image autoencoder does: its temporal blocks
start as the identity (models/autoencoder.py, start_params). A causal autoencoder starts from an image one of the same
widths whose downsampling factor is its autoencoder.spatial_compression_ratio: each 2-D kernel becomes the current
frame's tap of its 3-D one (models/autoencoder.py, inflated). With train.eval_every > 0 the start is scored too, as
step 0.

The workdir gets `checkpoints/` (parameters, optimizer state and input position; SIGTERM or Ctrl-C saves and
stops, rerunning resumes), `logs/`, `config.json`, and at the end `autoencoder/` (config.json and
diffusion_pytorch_model.safetensors: what `latent.autoencoder_path` and diffusers' AutoencoderKL.from_pretrained
read; its scaling_factor is 1 / the std of the training latents, as Stable Diffusion's), the PSNR, FID
(random-conv features) and, with lpips.path, LPIPS of reconstructed held-out images in `logs/reconstruction.json`
(on a video dataset every frame of train.eval_examples clips, and the FVD of the reconstructed clips; on a
dataset with a judge, captioned_shapes or moving_shapes, also its accuracy on them: what a latent model's samples
can reach at most), and `reconstructions.png` (the first of them above their reconstructions). The same scores are
measured every train.eval_every steps (0: at the end only) and appended, with the final ones, to `logs/eval.jsonl`
(and TensorBoard, `logs/eval`); reconstruction.json and reconstructions.png then show the latest.
"""

import json
import logging
import math
import pathlib
import sys
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import config_flags

from diffusion_jax import (checkpoint, cli, config_checks, distributed, media, metric_writers, optimizer, sharding,
                           stop_signals)
from diffusion_jax.data import pipeline
from diffusion_jax.metrics import fid, fvd, judges, lpips, psnr
from diffusion_jax.models import abstract_modules, autoencoder, discriminator, init_rngs

log = logging.getLogger("diffusion_jax.train_autoencoder")  # not __main__ under python -m
RECONSTRUCTIONS = 8  # held-out images shown in reconstructions.png


@flax.struct.dataclass
class AutoencoderState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState


@flax.struct.dataclass
class AdversarialState(AutoencoderState):
  """With the discriminator of the adversarial term (adversarial.weight > 0); checkpoints without it keep the
  layout of AutoencoderState's."""
  discriminator: dict
  discriminator_opt_state: optax.OptState


def problems(config) -> list[str]:
  """What is wrong with an autoencoder config, before anything is built."""
  a, t = config.autoencoder, config.train
  out = (config_checks.dataset_problems(config.data) + config_checks.data_source_problems(config.data)
         + config_checks.moving_shapes_problems(config.data) + config_checks.built_in_data_problems(config.data))
  out += config_checks.built_in_size_problems(config.data) + config_checks.optimizer_problems(config.optimizer)
  widths = list(a.block_out_channels)
  out += [f"autoencoder.{field}={a[field]} must be >= 1" for field in ("norm_num_groups", "latent_channels",
                                                                       "layers_per_block") if a[field] < 1]
  if a.norm_num_groups >= 1 and (not widths or any(w <= 0 or w % a.norm_num_groups for w in widths)):
    out.append(f"autoencoder.block_out_channels {tuple(widths)} must be positive multiples of "
               f"autoencoder.norm_num_groups={a.norm_num_groups}")
  causal, ratio = a.get("causal", False), a.get("spatial_compression_ratio", 0)
  if ratio and not causal:
    out.append(f"autoencoder.spatial_compression_ratio={ratio} is read by a causal autoencoder only "
               "(autoencoder.causal=True); an image autoencoder downsamples 2^(levels - 1): leave it at 0")
  elif ratio < 0 or ratio & (ratio - 1):
    out.append(f"autoencoder.spatial_compression_ratio={ratio} must be a power of 2 (or 0: 2^(levels - 1))")
  factor = ratio or 2 ** (len(widths) - 1)
  height, width = pipeline.image_size(config.data)
  sides = {"data.resolution": height} | ({"data.width": width} if config.data.width else {})
  out += [f"{name}={side} is not divisible by the downsampling factor {factor}"
          + ("" if ratio else f" of {len(widths)} levels") for name, side in sides.items() if side % factor]
  if (a.in_channels, a.out_channels) != (3, 3):
    out.append("autoencoder.in_channels and out_channels must be 3 (RGB, what latent diffusion models read)")
  for field in ("steps", "batch_size", "log_every", "checkpoint_every", "scale_batches", "eval_examples"):
    if t[field] <= 0:
      out.append(f"train.{field}={t[field]} must be > 0")
  if t.eval_every < 0:
    out.append(f"train.eval_every={t.eval_every} must be >= 0 (0: evaluate at the end only)")
  if not t.kl_weight >= 0:  # (NaN included, as below)
    out.append(f"train.kl_weight={t.kl_weight} must be >= 0")
  if not config.lpips.loss_weight >= 0:
    out.append(f"lpips.loss_weight={config.lpips.loss_weight} must be >= 0")
  if config.lpips.loss_weight > 0 and not config.lpips.path:
    out.append("lpips.loss_weight > 0 needs lpips.path, a local LPIPS weights directory (metrics/lpips.py)")
  if config.lpips.path:
    if min(height, width) < lpips.MIN_RESOLUTION:
      out.append(f"LPIPS (lpips.path) needs images of at least {lpips.MIN_RESOLUTION} pixels a side; "
                 f"data.resolution x data.width gives {height} x {width}")
    try:
      lpips.weight_files(config.lpips.path)
    except ValueError as error:
      out.append(f"lpips.path: {error}")
  adversarial = config.adversarial
  for field in ("weight", "start_step"):
    if not adversarial[field] >= 0:
      out.append(f"adversarial.{field}={adversarial[field]} must be >= 0")
  if t.init_from:
    try:
      source = autoencoder.read_config(t.init_from, "train.init_from")
    except ValueError as error:
      out.append(str(error))
    else:
      out += [f"train.init_from={t.init_from!r} cannot start this autoencoder: {problem} (match the autoencoder "
              "fields to its config.json, or leave train.init_from empty to start from scratch)"
              for problem in autoencoder.start_problems(source, model_config(config))]
  if a.get("temporal_decoder"):
    if a.norm_num_groups != 32:
      out.append(f"autoencoder.temporal_decoder: diffusers' AutoencoderKLTemporalDecoder normalises over 32 groups; "
                 f"set autoencoder.norm_num_groups=32 (not {a.norm_num_groups})")
    if config.data.dataset == "captioned_shapes":
      out.append("autoencoder.temporal_decoder decodes clips: give a video dataset (data.dataset='moving_shapes', or "
                 "a folder or TFDS dataset of videos)")
    if config.data.get("image_fraction", 0) > 0:
      out.append("autoencoder.temporal_decoder trains on whole clips: set data.image_fraction=0")
  if causal:
    if a.get("temporal_decoder"):
      out.append("autoencoder.causal and autoencoder.temporal_decoder are two layouts: set one")
    if len(widths) < 3:
      out.append(f"autoencoder.causal: diffusers' rule halves time at the two levels before the last, so a causal "
                 f"autoencoder needs at least 3 levels (autoencoder.block_out_channels has {len(widths)})")
    if config.data.dataset == "captioned_shapes":
      out.append("autoencoder.causal encodes clips: give a video dataset (data.dataset='moving_shapes', or a folder "
                 "or TFDS dataset of videos)")
    elif problem := autoencoder.frames_problem(model_config(config), "data.frames", config.data.frames):
      out.append(problem)
    if config.data.get("image_fraction", 0) > 0:
      out.append("autoencoder.causal trains on whole clips: set data.image_fraction=0")
  if adversarial.weight > 0:
    if adversarial.temporal and not (a.temporal_decoder or causal):
      out.append("adversarial.temporal judges clips, which only a temporal decoder or a causal autoencoder "
                 "reconstructs together: set autoencoder.temporal_decoder=True or autoencoder.causal=True (on a "
                 "video dataset), or adversarial.temporal=False")
    if adversarial.layers < 1 or adversarial.channels < 1:
      out.append(f"adversarial.layers={adversarial.layers} and adversarial.channels={adversarial.channels} must be "
                 ">= 1")
    elif discriminator.output_size(min(height, width), adversarial.layers) < 1:
      out.append(f"the discriminator's {adversarial.layers} stride-2 layers (adversarial.layers) leave no patch of "
                 f"{height} x {width} images (data.resolution x data.width): use fewer")
  return out


def validate(config, mesh) -> None:
  found = problems(config)
  data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.train.batch_size % data_parallel:
    found.append(f"train.batch_size={config.train.batch_size} is not divisible by the {data_parallel} "
                 "data-parallel devices of config.mesh")
  if config.train.eval_examples < data_parallel:
    found.append(f"train.eval_examples={config.train.eval_examples} must be at least the {data_parallel} "
                 "data-parallel devices of config.mesh (one image each)")
  if config.train.batch_size % jax.process_count():
    found.append(f"train.batch_size={config.train.batch_size} is not divisible by {jax.process_count()} processes")
  if mesh.shape["sequence"] > 1:
    found.append(f"mesh.sequence={mesh.shape['sequence']}: sequence parallelism splits a video diffusion model's "
                 "frames; the autoencoder trainer would only repeat its work on those devices: leave it 1")
  if found:
    raise ValueError("The autoencoder config has problems:\n  - " + "\n  - ".join(found))


def model_config(config, scaling_factor: float = 1.0) -> dict:
  return autoencoder.diffusers_config(config.autoencoder.to_dict(), scaling_factor)


def discriminator_layout(config) -> str:
  """What the checkpoints' discriminator is ("none" without the adversarial term; configs older than it have none)."""
  a = config.get("adversarial")
  if not a or a.weight == 0:
    return "none"
  return f"{a.layers} layers, {a.channels} channels" + (", 3-D over clips" if a.get("temporal") else "")


def make_discriminator(config, rngs) -> discriminator.PatchDiscriminator:
  return discriminator.PatchDiscriminator(*discriminator_arguments(config), rngs=rngs)


def discriminator_arguments(config) -> tuple:
  """PatchDiscriminator's arguments (before rngs) for the config's adversarial term."""
  a = config.adversarial
  return config.autoencoder.out_channels, a.channels, a.layers, a.temporal


def init_state(config, mesh) -> AutoencoderState:
  """The initial state, built sharded; an AdversarialState with adversarial.weight > 0."""
  tx, replicated = optimizer.make(config, optimizer.hyperparameters(config)), sharding.replicated(mesh)

  def params_and_opt_state(module_class, arguments, seed):
    shardings = sharding.state_shardings(nnx.state(abstract_modules.of(module_class, *arguments)), mesh)
    init = lambda key: nnx.to_pure_dict(nnx.state(module_class(*arguments, rngs=init_rngs.seeded(key))))
    params = jax.jit(init, out_shardings=shardings)(jax.random.key(seed))
    return params, jax.jit(tx.init, out_shardings=optimizer.state_shardings(tx, params, shardings, replicated))(params)

  params, opt_state = params_and_opt_state(autoencoder.AutoencoderKL, (model_config(config),), config.seed)
  step = jax.device_put(jnp.zeros((), jnp.int32), replicated)
  if config.adversarial.weight == 0:
    return AutoencoderState(step=step, params=params, opt_state=opt_state)
  discriminator_params, discriminator_opt_state = params_and_opt_state(
      discriminator.PatchDiscriminator, discriminator_arguments(config), config.seed + 1)
  return AdversarialState(step=step, params=params, opt_state=opt_state, discriminator=discriminator_params,
                          discriminator_opt_state=discriminator_opt_state)


def started(config, state: AutoencoderState) -> AutoencoderState:
  """A fresh state whose autoencoder starts from train.init_from's weights (autoencoder.start_params), each placed
  as the fresh one was."""
  source = autoencoder.load_diffusers(config.train.init_from)
  fresh = multihost_utils.process_allgather(state.params, tiled=True)  # whole arrays on every process
  params = autoencoder.start_params(autoencoder.read_config(config.train.init_from),
                                    jax.device_get(nnx.to_pure_dict(nnx.state(source, nnx.Param))),
                                    model_config(config), fresh)
  return state.replace(params=jax.device_put(params, jax.tree.map(lambda x: x.sharding, state.params)))


def pixels(batch: dict) -> jax.Array:
  """The batch's images [n, h, w, 3] or clips [n, frames, h, w, 3]."""
  return batch["video"] if "video" in batch else batch["image"]


def images(batch: dict) -> jax.Array:
  """The batch's images [n, h, w, 3]; a video batch's frames folded into n."""
  return frames(pixels(batch))


def frames(x: jax.Array) -> jax.Array:
  """Images or clips [..., h, w, c] as images [n, h, w, c]."""
  return x.reshape((-1,) + x.shape[-3:])


def reconstructs_clips(config) -> bool:
  """Whether the autoencoder reconstructs whole clips (a temporal decoder or a causal autoencoder)."""
  return bool(config.autoencoder.get("temporal_decoder") or config.autoencoder.get("causal"))


def inputs(config, batch: dict) -> jax.Array:
  """What the autoencoder reconstructs: clips [batch, frames, h, w, 3] for a temporal decoder or a causal
  autoencoder, else images."""
  if reconstructs_clips(config):
    if "video" not in batch:
      layout = "causal" if config.autoencoder.get("causal") else "temporal_decoder"
      raise ValueError(f"autoencoder.{layout} needs clips, and data.dataset={config.data.dataset!r} gives images: "
                       "give a video dataset (data.dataset='moving_shapes', or a folder or TFDS dataset of videos) "
                       f"or set autoencoder.{layout}=False")
    return batch["video"]
  return images(batch)


def perceptual_model(config, mesh):
  """(graphdef, state replicated over the mesh) of the LPIPS network of the perceptual loss term; (None, None)
  when lpips.loss_weight is 0."""
  if not config.lpips.loss_weight:
    return None, None
  graphdef, state = nnx.split(lpips.load(config.lpips.path))
  return graphdef, jax.device_put(state, sharding.replicated(mesh))


def last_layer(config) -> tuple[str, ...]:
  """The path in the decoder of the layer whose kernel SD's adaptive weight differentiates: its last (a temporal
  decoder's 3x1x1 convolution, as sgm's VideoDecoder's get_last_layer; a causal decoder's causal convolution)."""
  if config.autoencoder.get("causal"):
    return ("conv_out", "conv")
  return ("time_conv_out",) if config.autoencoder.temporal_decoder else ("conv_out",)


def last_kernel(params: dict, layer: tuple[str, ...]):
  for key in ("decoder",) + layer + ("kernel",):
    params = params[key]
  return params


def with_last_kernel(params: dict, kernel, layer: tuple[str, ...]) -> dict:
  """The autoencoder's params with the kernel of the decoder's `layer` (last_layer) replaced."""
  replaced = lambda tree, path: kernel if not path else {**tree, path[0]: replaced(tree[path[0]], path[1:])}
  return replaced(params, ("decoder",) + layer + ("kernel",))


def make_train_step(config, graphdef, perceptual_graphdef=None):
  """`(state, batch, hparams, perceptual_state) -> (state, metrics)`: one AdamW step of the autoencoder (and of its
  discriminator, when the state is an AdversarialState) on the losses in the module docstring; perceptual_state:
  the LPIPS network's (perceptual_model), None without the perceptual term."""
  kl_weight, perceptual_weight, adversarial = config.train.kl_weight, config.lpips.loss_weight, config.adversarial
  discriminator_graphdef = nnx.graphdef(abstract_modules.of(discriminator.PatchDiscriminator,
                                                             *discriminator_arguments(config)))

  def critic(discriminator_params, images, shape):
    """Patch logits of images [n, h, w, 3], each alone, or by a temporal discriminator as the clips of `shape` (the
    inputs') that they are the frames of."""
    judged = images.reshape(shape) if adversarial.temporal else images
    return nnx.merge(discriminator_graphdef, discriminator_params)(judged)

  def reconstruct(params, x, key):
    """x: images, or clips for a temporal decoder or a causal autoencoder -> (reconstructed images [n, h, w, 3],
    the posterior's KL divergence from N(0, I) summed over each image's latents [n]; n the images or the clips'
    frames, a clip's KL shared evenly by its frames)."""
    model = nnx.merge(graphdef, params)
    mean, logvar = model.posterior(x)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar).sum(axis=tuple(range(1, mean.ndim)))
    if x.ndim == 5:  # per clip, shared by its frames
      kl = jnp.repeat(kl / x.shape[1], x.shape[1])
    return frames(model.decode_unscaled(z)), kl

  def reconstruction_loss(reconstruction, x, perceptual_state):
    """Per example [n]: the L1 error summed over pixels (+ the perceptual term); and its logged parts."""
    error = jnp.abs(reconstruction - x).sum(axis=(1, 2, 3))
    loss, parts = error, {"l1": jnp.mean(error) / np.prod(x.shape[1:])}
    if perceptual_state is not None:
      distance = lpips.distance(nnx.merge(perceptual_graphdef, perceptual_state), reconstruction, x)
      loss, parts["lpips"] = loss + perceptual_weight * np.prod(x.shape[1:]) * distance, jnp.mean(distance)
    return loss, parts

  def adaptive_weight(params, x, key, perceptual_state, discriminator_params):
    """SD's weight of the generator loss (module docstring), from the gradients of the two losses with respect to
    the decoder's last kernel."""
    layer = last_layer(config)
    reconstruction, pullback = jax.vjp(lambda k: reconstruct(with_last_kernel(params, k, layer), x, key)[0],
                                       last_kernel(params, layer))
    grad_of = lambda loss: pullback(jax.grad(loss)(reconstruction))[0]
    reconstruction_grad = grad_of(lambda r: jnp.mean(reconstruction_loss(r, frames(x), perceptual_state)[0]))
    generator_grad = grad_of(lambda r: discriminator.generator_loss(critic(discriminator_params, r, x.shape)))
    ratio = jnp.linalg.norm(reconstruction_grad) / (jnp.linalg.norm(generator_grad) + 1e-4)
    return jnp.clip(ratio, 0.0, 1e4) * adversarial.weight

  def loss_fn(params, x, key, perceptual_state, discriminator_params, generator_weight, started):
    reconstruction, kl = reconstruct(params, x, key)
    loss, parts = reconstruction_loss(reconstruction, frames(x), perceptual_state)
    loss, parts["kl"] = jnp.mean(loss + kl_weight * kl), jnp.mean(kl)
    if discriminator_params is not None:  # the discriminator is not run (0) before adversarial.start_step
      parts["generator_loss"] = jax.lax.cond(
          started, lambda r: discriminator.generator_loss(critic(discriminator_params, r, x.shape)), lambda r: 0.0,
          reconstruction)
      loss = loss + generator_weight * parts["generator_loss"]
    return loss, (parts, reconstruction)

  def train_step(state: AutoencoderState, batch: dict, hparams: dict, perceptual_state=None):
    key = jax.random.fold_in(jax.random.key(config.seed), state.step)
    x, tx = inputs(config, batch), optimizer.make(config, hparams)
    adversarial_on = isinstance(state, AdversarialState)
    started = state.step >= adversarial.start_step
    generator_weight = jax.lax.cond(  # computed only once the discriminator has started
        started, lambda: jax.lax.stop_gradient(adaptive_weight(state.params, x, key, perceptual_state,
                                                               state.discriminator)),
        lambda: jnp.zeros(())) if adversarial_on else None
    discriminator_params = state.discriminator if adversarial_on else None
    (loss, (parts, reconstruction)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, x, key, perceptual_state, discriminator_params, generator_weight, started)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    finite = jnp.isfinite(loss)  # a non-finite step leaves the state as it was
    keep = lambda new, old, when: jax.tree.map(lambda n, o: jnp.where(when, n, o), new, old)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "nonfinite": 1 - finite.astype(jnp.int32),
               "learning_rate": optimizer.learning_rate(state.step, hparams, config.optimizer.schedule), **parts}
    new = state.replace(step=state.step + 1, params=keep(optax.apply_updates(state.params, updates), state.params,
                                                         finite), opt_state=keep(opt_state, state.opt_state, finite))
    if adversarial_on:  # the discriminator's step on the same real images and (fixed) reconstructions
      fake = jax.lax.stop_gradient(reconstruction)
      hinge = lambda p: discriminator.hinge_discriminator_loss(critic(p, frames(x), x.shape),
                                                               critic(p, fake, x.shape))

      def discriminator_step():
        loss, grads = jax.value_and_grad(hinge)(state.discriminator)
        updates, opt_state = tx.update(grads, state.discriminator_opt_state, state.discriminator)
        ok = finite & jnp.isfinite(loss)
        return (keep(optax.apply_updates(state.discriminator, updates), state.discriminator, ok),
                keep(opt_state, state.discriminator_opt_state, ok), loss)

      idle = lambda: (state.discriminator, state.discriminator_opt_state, jnp.zeros(()))
      discriminator_params, discriminator_opt_state, discriminator_loss = jax.lax.cond(
          started, discriminator_step, idle)  # nothing computed (loss logged as 0) before adversarial.start_step
      new = new.replace(discriminator=discriminator_params, discriminator_opt_state=discriminator_opt_state)
      metrics |= {"discriminator_loss": discriminator_loss, "generator_weight": generator_weight}
    return new, metrics

  return train_step


def latent_std(config, graphdef, params, batches) -> float:
  """The std of posterior draws of the latents of `batches` (global batches of images, all of one size)."""
  @jax.jit
  def moments(p, x, key):  # replicated scalars: every process reads them
    z = nnx.merge(graphdef, p).encode(x, key)
    return jnp.stack([jnp.mean(z), jnp.mean(jnp.square(z))])

  mean, mean_square = np.mean([moments(params, inputs(config, b), jax.random.key(i)) for i, b in enumerate(batches)],
                              axis=0)
  return float(np.sqrt(mean_square - np.square(mean)))


@jax.jit
def round_trip(model, x):
  """(x, the reconstruction of x from its posterior mean, clipped to [-1, 1]), both as images [n, h, w, 3] (a
  clip's frames decoded together by a temporal decoder); one compiled program for every evaluation of a run."""
  return frames(x), frames(jnp.clip(model.decode(model.encode(x)), -1, 1))


def evaluate(config, model, mesh, workdir) -> dict | None:
  """Reconstruct (posterior means) up to train.eval_examples held-out images or clips (every frame of them, decoded
  by a temporal decoder together, by an image decoder each alone): their PSNR and FID (random-conv features) against
  the originals, for clips also the FVD (random-conv features) of the reconstructed clips, and on a dataset with
  a judge (metrics/judges.py) its accuracy on them against their captions; in logs/reconstruction.json.
  reconstructions.png shows the first ones. Every process reconstructs its part of each batch; process 0 scores
  and writes, and returns the scores (None elsewhere, and when the validation split has fewer images than the
  data-parallel devices)."""
  source = pipeline.data_source(config.data, "validation")
  data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
  examples = min(config.train.eval_examples, len(source))
  if examples < data_parallel:  # train.eval_examples is checked before training; the split's size only now
    log.warning("the validation split has %d images, fewer than the %d data-parallel devices: no reconstruction "
                "scores.", len(source), data_parallel)
    return None
  batch = data_parallel * (min(config.train.batch_size, examples) // data_parallel)
  loader = iter(pipeline.make_loader(config.data, source, None, batch // jax.process_count(), seed=0, shuffle=False))
  keep = ("image", "video", pipeline.RECORD_INDEX)
  parts = []
  for _ in range(-(-examples // batch)):
    local = {k: v for k, v in next(loader).items() if k in keep}
    global_batch = pipeline.to_global(local, sharding.batch_sharding(mesh))
    x = pixels(global_batch)  # clips: an image decoder decodes each frame alone
    pair = round_trip(model, x)
    parts.append(multihost_utils.process_allgather((*pair, global_batch[pipeline.RECORD_INDEX]), tiled=True))
  if jax.process_index() != 0:
    return None
  per_example = math.prod(x.shape[1:-3])  # images per example: a clip's frames
  originals, outputs = (media.to_uint8(np.concatenate([p[i] for p in parts])[:examples * per_example]) for i in (0, 1))
  records = np.concatenate([p[2] for p in parts])[:examples]
  result = {"examples": len(originals), "psnr_db": psnr.psnr(outputs, originals),
            "fid_random_conv": fid.fid(fid.random_conv_features(originals), fid.random_conv_features(outputs))}
  as_examples = lambda images: images.reshape((examples, *x.shape[1:-3], *images.shape[1:]))  # clips again
  if per_example > 1:  # clips: how far the reconstructed clips are from the originals as videos (flicker counts)
    result["fvd_random_conv"] = fvd.fvd(as_examples(originals), as_examples(outputs))
  if config.lpips.path:
    result["lpips"] = lpips.mean_distance(lpips.load(config.lpips.path), outputs, originals)
  if config.data.dataset in judges.JUDGES:  # the judge's scores a latent model's samples can reach at most
    captions = [source[int(i)][config.data.caption_key] for i in records]
    result |= judges.accuracy(config, as_examples(outputs), captions, "judge/")
  label = f"reconstructions ({result['psnr_db']:.1f} dB PSNR over {len(originals)} held-out images)"
  grid = media.labelled_grid([originals[:RECONSTRUCTIONS], outputs[:RECONSTRUCTIONS]], ["held-out images", label],
                             scale=4)
  media.save_png(pathlib.Path(workdir) / "reconstructions.png", grid, {k: str(v) for k, v in result.items()})
  (pathlib.Path(workdir) / "logs" / "reconstruction.json").write_text(json.dumps(result, indent=2))
  return result


def train(config, workdir: str) -> pathlib.Path:
  """Train (resuming from the workdir's checkpoints), then write the diffusers directory; returns its path (None
  when a stop signal ended the run before train.steps)."""
  found = problems(config)
  if found:
    raise ValueError("The autoencoder config has problems:\n  - " + "\n  - ".join(found))
  checkpoint.prepare_workdir(workdir)
  with checkpoint.workdir_lock(workdir):
    return _train(config, str(workdir))


def _train(config, workdir: str) -> pathlib.Path:
  mesh = sharding.make_mesh(config.mesh)
  validate(config, mesh)
  graphdef = nnx.graphdef(abstract_modules.of(autoencoder.AutoencoderKL, model_config(config)))
  saved = pathlib.Path(workdir) / "config.json"
  mngr = checkpoint.manager(workdir, keep=config.train.keep_checkpoints)
  if mngr.all_steps() and saved.exists():
    trained = checkpoint.read_config(workdir, "autoencoder")
    for field, before in (("temporal_decoder", False), ("causal", False), ("spatial_compression_ratio", 0)):
      if field in config.autoencoder and field not in trained.autoencoder:
        trained.autoencoder[field] = before  # a run from before the field: an image autoencoder
    changed = [d for d in checkpoint.config_differences(trained, config) if d.startswith("autoencoder.")]
    if discriminator_layout(trained) != discriminator_layout(config):
      changed.append(f"discriminator: {discriminator_layout(trained)} -> {discriminator_layout(config)}")
    if changed:
      raise ValueError(f"--workdir={workdir} holds checkpoints of another autoencoder ({'; '.join(changed)}): "
                       "use a new workdir, or the config it was trained with.")
  state = init_state(config, mesh)
  per_process = config.train.batch_size // jax.process_count()
  source = pipeline.data_source(config.data, "train")
  data_iter = iter(pipeline.make_loader(config.data, source, None, per_process, seed=config.seed))
  if mngr.all_steps():
    state, step = checkpoint.restore(mngr, state)
    log.info("resumed from step %d", step)
    unfit = checkpoint.restore_input_position(mngr, step, data_iter)
    if distributed.any_process(unfit is not None):
      log.warning("the input position saved at step %d does not fit this run (%s): the data order restarts with "
                  "a new shuffle (seed %d).", step, unfit or "on another process", config.seed + step)
      data_iter = iter(pipeline.make_loader(config.data, source, None, per_process, seed=config.seed + step))
  elif config.train.init_from:
    state = started(config, state)
    log.info("started from the autoencoder in %s", config.train.init_from)
  if jax.process_index() == 0:
    checkpoint.write_config(workdir, config)
  step = int(state.step)
  batch_sharding = sharding.batch_sharding(mesh)
  next_batch = lambda: pipeline.to_global({k: v for k, v in next(data_iter).items() if k in ("image", "video")},
                                          batch_sharding)
  hparams = optimizer.hyperparameters(config)
  perceptual_graphdef, perceptual_state = perceptual_model(config, mesh)
  compiled = jax.jit(make_train_step(config, graphdef, perceptual_graphdef), donate_argnums=0)
  log.info("autoencoder: %d parameters, %d-fold downsampling, %s latents", sum(x.size for x in jax.tree.leaves(
      state.params)), autoencoder.downsampling_factor(model_config(config)), config.autoencoder.latent_channels)
  writer = metric_writers.MetricWriter(workdir, config.train.steps)
  eval_writer = metric_writers.MetricWriter(workdir, config.train.steps, name="eval")
  writer.start(step)
  save = lambda: checkpoint.save(mngr, step, state, data_iter, force=True)

  def scored(model) -> dict | None:  # every process reconstructs; process 0 logs the scores
    result = evaluate(config, model, mesh, workdir)
    if result is not None:
      eval_writer.write(step, result)
    return result

  if step == 0 and config.train.init_from and config.train.eval_every:
    scored(nnx.merge(graphdef, state.params))  # where the run starts: step 0 of logs/eval.jsonl
  interval_start, interval_steps = time.perf_counter(), 0  # step time and throughput since the last log line
  with stop_signals.StopSignals(stop_signals.job_signals()) as stop:
    while step < config.train.steps:
      state, metrics = compiled(state, next_batch(), hparams, perceptual_state)
      step, interval_steps = step + 1, interval_steps + 1
      if step % config.train.log_every == 0 or step == config.train.steps:
        metrics = jax.device_get(metrics)  # waits for the step: the interval's time is its steps' time
        step_time = (time.perf_counter() - interval_start) / interval_steps
        writer.write(step, {**metrics, "step_time_s": step_time,
                            "examples_per_s": config.train.batch_size / step_time})
        interval_start, interval_steps = time.perf_counter(), 0
        if not np.isfinite(float(metrics["loss"])):
          save()
          mngr.wait_until_finished()
          raise FloatingPointError(f"non-finite loss at step {step}; the state before it is saved in {workdir}. "
                                   "Lower optimizer.learning_rate.")
      stopping = stop_signals.all_stop(stop, step, config.train.log_every) or mngr.reached_preemption(step)
      if step % config.train.checkpoint_every == 0 or step == config.train.steps or stopping:
        save()
      if stopping:
        break
      if config.train.eval_every and step % config.train.eval_every == 0 and step < config.train.steps:
        eval_start = time.perf_counter()
        scored(nnx.merge(graphdef, state.params))  # encode then decode: the scaling factor cancels
        interval_start += time.perf_counter() - eval_start  # step times leave evaluations out
    mngr.wait_until_finished()
  writer.close()
  if step < config.train.steps:
    eval_writer.close()
    log.warning("%s: checkpoint saved at step %d of %d; rerun the same command to resume.",
                stop.received or "stop requested by another process or a preemption notice", step, config.train.steps)
    return None
  std = latent_std(config, graphdef, state.params, [next_batch() for _ in range(config.train.scale_batches)])
  trained = model_config(config, 1.0 / std)
  model = nnx.merge(nnx.graphdef(abstract_modules.of(autoencoder.AutoencoderKL, trained)), state.params)
  directory = pathlib.Path(workdir) / "autoencoder"
  params = multihost_utils.process_allgather(state.params, tiled=True)  # whole arrays on every process
  if jax.process_index() == 0:
    autoencoder.save_diffusers(nnx.merge(nnx.graphdef(model), params), trained, directory)
  result = scored(model)
  eval_writer.close()
  if result is not None:
    log.info("reconstructions of %d held-out images: %.2f dB PSNR, FID (random conv) %.3g (%s)", result["examples"],
             result["psnr_db"], result["fid_random_conv"], pathlib.Path(workdir) / "reconstructions.png")
  log.info("autoencoder written to %s (scaling_factor %.4g); train on it with --config.latent.autoencoder_path=%s",
           directory, 1.0 / std, directory)
  return directory


def main(argv):
  del argv
  f = flags.FLAGS
  if f.workdir is None or f.config is None:
    raise app.UsageError("--config and --workdir are required.")
  distributed.initialize()
  try:
    train(f.config, f.workdir)
  except ValueError as error:  # configuration, data and path errors a user can fix
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print(f"interrupted; rerun the same command to resume from the last checkpoint in {f.workdir}, if any.",
          file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Autoencoder config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Work directory (checkpoints, logs, the trained autoencoder).")
  distributed.define_flags()
  cli.run(main, config_kinds={"config": "autoencoder"})
