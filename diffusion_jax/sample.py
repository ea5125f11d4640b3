"""Sampling job: generate images for prompts from a training workdir's checkpoint.

  python -m diffusion_jax.sample --workdir=DIR --prompts=prompts.txt [--output_dir=DIR/samples/...]

Flags:
  --workdir         training workdir (holds config.json and checkpoints/); required
  --step            checkpoint step (default: the latest)
  --prompts         text file, one prompt per line, or .jsonl with {"prompt", "seed"?, "guidance_scale"?};
                    default: the config's sample.prompts
  --output_dir      where PNGs, grid.png and manifest.jsonl go (default: WORKDIR/samples/step_<N>)
  --sampler         one of samplers.SAMPLERS (default: config sample.sampler)
  --steps           sampler steps, >= 1 (default: config sample.steps)
  --guidance_scale  classifier-free guidance scale, >= 0 (default: config sample.guidance_scale)
  --num_per_prompt  images per prompt (default: config sample.num_per_prompt)
  --seed            noise seed (default: config sample.seed)
  --use_ema         sample with the first EMA copy of the weights (default: config sample.use_ema)

Every PNG carries its provenance (prompt, seed, sampler, steps, guidance, checkpoint step, config hash)
as PNG text chunks, and the same record is a line of manifest.jsonl.
"""

import hashlib
import json
import logging
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from jax.experimental import multihost_utils

from diffusion_jax import checkpoint, media, samplers, schedules, sharding

MAX_PROMPT_CHARS = 2000


def make_generate_fn(config, graphdef, sample_config):
  """(params, frozen, key, ids [n, tokens], mask [n, tokens]) -> images [n, res, res, 3] in [-1, 1]."""
  d, s = config.diffusion, sample_config
  logsnr = schedules.continuous_logsnr_grid(schedules.logsnr_schedule(d.schedule, **d.schedule_params), s.steps)
  alpha, sigma = schedules.alpha_sigma_from_logsnr(logsnr, d.path)
  shape = (config.data.resolution, config.data.resolution, config.model.in_channels)

  def generate(params, frozen, key, ids, mask):
    model = nnx.merge(graphdef, params, frozen)
    text = model.encode(ids, mask)
    null_text, null_mask = jnp.zeros_like(text), jnp.zeros_like(mask)

    def network_fn(x, logsnr, conditional):
      if conditional:
        return model(x, logsnr, text, mask)
      return model(x, logsnr, null_text, null_mask)

    denoise = samplers.make_denoiser(network_fn, d.prediction, s.guidance_scale, s.guidance_rescale, s.threshold,
                                     s.threshold_percentile, d.sigma_data)
    noise_key, sampler_key = jax.random.split(key)
    x_init = sigma[0] * jax.random.normal(noise_key, (ids.shape[0],) + shape)
    images = samplers.sample(denoise, x_init, alpha, sigma, s.sampler, key=sampler_key, eta=s.eta)
    return jnp.clip(images, -1.0, 1.0)

  return generate


def generate(config, graphdef, params, frozen, tokenizer, prompts, sample_config, mesh) -> np.ndarray:
  """Images [len(prompts), num_per_prompt, res, res, 3] uint8; the batch is sharded over all devices."""
  n = sample_config.num_per_prompt
  repeated = [p for p in prompts for _ in range(n)]
  devices = mesh.size
  padded = repeated + [""] * (-len(repeated) % devices)
  ids, mask = tokenizer(padded)
  batch = sharding.batch_sharding(mesh)
  ids, mask = (jax.device_put(a, batch) for a in (ids, mask))
  fn = jax.jit(make_generate_fn(config, graphdef, sample_config), out_shardings=batch)
  images = fn(params, frozen, jax.random.PRNGKey(sample_config.seed), ids, mask)
  images = np.asarray(multihost_utils.process_allgather(images, tiled=True))
  return media.to_uint8(images[:len(repeated)]).reshape((len(prompts), n) + images.shape[1:])


def config_hash(config) -> str:
  return hashlib.sha256(config.to_json_best_effort(sort_keys=True).encode()).hexdigest()[:12]


def write_outputs(output_dir, prompts, images, provenance: dict) -> pathlib.Path:
  """One PNG per sample, grid.png, manifest.jsonl; returns the grid path."""
  output_dir = pathlib.Path(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  with open(output_dir / "manifest.jsonl", "w") as manifest:
    for p, (prompt, row) in enumerate(zip(prompts, images)):
      for i, image in enumerate(row):
        record = {**provenance, "prompt": prompt, "index": i, "file": f"p{p:03d}_{i:02d}.png"}
        media.save_png(output_dir / record["file"], image, record)
        manifest.write(json.dumps(record) + "\n")
  grid_path = output_dir / "grid.png"
  media.save_png(grid_path, media.labelled_grid(list(images), list(prompts)), {**provenance, "prompts": prompts})
  return grid_path


def read_prompts(path) -> list[str]:
  path = pathlib.Path(path)
  if not path.exists():
    raise ValueError(f"Prompts file {str(path)!r} does not exist.")
  lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
  if path.suffix == ".jsonl":
    try:
      prompts = [json.loads(line)["prompt"] for line in lines]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
      raise ValueError(f"{str(path)!r}: each line must be a JSON object with a 'prompt' ({error}).") from None
  else:
    prompts = lines
  if not prompts:
    raise ValueError(f"Prompts file {str(path)!r} has no prompts.")
  return [p[:MAX_PROMPT_CHARS] for p in prompts]


# ----------------------------------------------------------------------------- CLI

def load_checkpoint(workdir, step=None):
  """(config, state, graphdef, step, mesh) of a training workdir's checkpoint (default: latest), restored
  onto a data-parallel mesh over all devices."""
  from diffusion_jax import train  # the state layout lives with the trainer

  config = checkpoint.read_config(workdir)
  mngr = checkpoint.manager(workdir, read_only=True)
  if not mngr.all_steps():
    raise ValueError(f"No checkpoints in {str(workdir)!r}/checkpoints; train first.")
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  tx, _ = train.make_optimizer(config, config.train.steps)
  state, graphdef = train.init_state(config, mesh, tx)
  state, step = checkpoint.restore(mngr, state, step=step)
  return config, state, graphdef, step, mesh


def sample_from_workdir(workdir, overrides: dict, prompts_path=None, step=None, output_dir=None):
  from diffusion_jax.text import tokenizers

  config = checkpoint.read_config(workdir)
  sample_config = config.sample
  sample_config.update({k: v for k, v in overrides.items() if v is not None})
  problems = []
  if sample_config.sampler not in samplers.SAMPLERS:
    problems.append(f"--sampler={sample_config.sampler!r} is not one of {list(samplers.SAMPLERS)}")
  if sample_config.steps < 1:
    problems.append(f"--steps={sample_config.steps} must be >= 1")
  if sample_config.guidance_scale < 0:
    problems.append(f"--guidance_scale={sample_config.guidance_scale} must be >= 0")
  if problems:
    raise ValueError("; ".join(problems))
  prompts = read_prompts(prompts_path) if prompts_path else list(sample_config.prompts)
  config, state, graphdef, step, mesh = load_checkpoint(workdir, step)
  params = state.ema[0] if sample_config.use_ema else state.params
  return write_samples(config, graphdef, params, state.frozen, tokenizers.from_config(config), prompts,
                       sample_config, mesh, step, output_dir or pathlib.Path(workdir) / "samples" / f"step_{step}")


def write_samples(config, graphdef, params, frozen, tokenizer, prompts, sample_config, mesh, step, output_dir):
  images = generate(config, graphdef, params, frozen, tokenizer, prompts, sample_config, mesh)
  output_dir = pathlib.Path(output_dir)
  if jax.process_index() != 0:  # every process samples its shard; process 0 writes
    return output_dir / "grid.png"
  provenance = {"seed": sample_config.seed, "sampler": sample_config.sampler, "steps": sample_config.steps,
                "guidance_scale": sample_config.guidance_scale, "checkpoint_step": int(step),
                "ema": bool(sample_config.use_ema), "config_hash": config_hash(config)}
  return write_outputs(output_dir, prompts, images, provenance)


def define_flags():
  """Flags of the sampling CLI (defined only when this module is the program)."""
  flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/).")
  flags.DEFINE_integer("step", None, "Checkpoint step; default latest.")
  flags.DEFINE_string("prompts", None, "Prompts file (.txt one per line, or .jsonl); default config prompts.")
  flags.DEFINE_string("output_dir", None, "Output directory; default WORKDIR/samples/step_<N>.")
  flags.DEFINE_string("sampler", None, f"Sampler, one of {list(samplers.SAMPLERS)}.")
  flags.DEFINE_integer("steps", None, "Sampler steps (>= 1).")
  flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale (>= 0).")
  flags.DEFINE_integer("num_per_prompt", None, "Images per prompt.")
  flags.DEFINE_integer("seed", None, "Noise seed.")
  flags.DEFINE_bool("use_ema", None, "Use EMA weights (default: config sample.use_ema).")


def main(argv):
  del argv
  f = flags.FLAGS
  if not f.workdir:
    raise app.UsageError("--workdir is required.")
  overrides = {"sampler": f.sampler, "steps": f.steps, "guidance_scale": f.guidance_scale,
               "num_per_prompt": f.num_per_prompt, "seed": f.seed, "use_ema": f.use_ema}
  try:
    grid = sample_from_workdir(f.workdir, overrides, f.prompts, f.step, f.output_dir)
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  logging.info("wrote %s", grid)
  print(grid)


if __name__ == "__main__":
  define_flags()
  app.run(main)
