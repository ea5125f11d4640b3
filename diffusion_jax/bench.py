"""Benchmarks that print tables. Everything is measured as ratios inside one run (these machines are noisy).

  python -m diffusion_jax.bench input --config=configs/t2i_shapes.py [--config.x=y] [--steps=20]

Modes:
  input   input-pipeline examples/s (grain, 0 and N worker processes) next to the examples/s the
          compiled train step consumes on this machine; the pipeline keeps up when the ratio is >= 1.
Flags:
  --config   experiment config (overridable with --config.<field>=<value>)
  --steps    batches / train steps timed per measurement (default 20)
  --workers  grain worker processes for the second pipeline measurement (default 2)
"""

import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", "configs/t2i_shapes.py", "Experiment config file.", lock_config=True)
flags.DEFINE_integer("steps", 20, "Batches / train steps timed per measurement.")
flags.DEFINE_integer("workers", 2, "Grain worker processes for the second pipeline measurement.")


def pipeline_examples_per_s(config, workers: int, batches: int) -> float:
  from diffusion_jax.data import pipeline
  from diffusion_jax.text import tokenizers

  data = config.data.copy_and_resolve_references()
  data.worker_count = workers
  source = pipeline.data_source(data, "train")
  iterator = iter(pipeline.make_loader(data, source, tokenizers.from_config(config), config.train.batch_size,
                                       seed=0))
  next(iterator)  # start-up (worker processes, first decode) is not throughput
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  return batches * config.train.batch_size / (time.perf_counter() - start)


def train_step_examples_per_s(config, steps: int) -> float:
  from diffusion_jax import sharding, train

  mesh = sharding.make_mesh(config.mesh)
  tx, lr = train.make_optimizer(config, config.train.steps)
  state, graphdef = train.init_state(config, mesh, tx)
  b, r, n = config.train.batch_size, config.data.resolution, config.text.max_length
  batch_np = {"image": np.zeros((b, r, r, 3), np.float32), "text_ids": np.ones((b, n), np.int32),
              "text_mask": np.ones((b, n), bool)}
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch_np.items()}
  compiled, _ = train.compile_step(train.make_train_step(config, graphdef, tx, lr), state, shapes, mesh)
  from diffusion_jax.data import pipeline

  batch = pipeline.to_global(batch_np, sharding.batch_sharding(mesh))
  state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  return steps * b / (time.perf_counter() - start)


def input_table(config, steps: int, workers: int) -> str:
  consumed = train_step_examples_per_s(config, max(steps // 4, 2))
  rows = [("train step consumes", consumed, 1.0)]
  for w in (0, workers):
    produced = pipeline_examples_per_s(config, w, steps)
    rows.append((f"pipeline, {w} workers", produced, produced / consumed))
  lines = ["| what | examples/s | / train step |", "|---|---|---|"]
  lines += [f"| {name} | {rate:.1f} | {ratio:.2f} |" for name, rate, ratio in rows]
  return "\n".join(lines)


def main(argv):
  if len(argv) != 2 or argv[1] not in ("input",):
    raise app.UsageError("usage: python -m diffusion_jax.bench input --config=... (modes: input)")
  f = flags.FLAGS
  print(f"# {argv[1]} benchmark, {jax.device_count()} x {jax.devices()[0].device_kind}, batch "
        f"{f.config.train.batch_size}, {f.config.data.resolution}px")
  print(input_table(f.config, f.steps, f.workers))


if __name__ == "__main__":
  app.run(main)
