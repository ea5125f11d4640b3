"""Benchmarks that print tables. Everything is measured as ratios inside one run (these machines are noisy).

  python -m diffusion_jax.bench MODE --config=configs/t2i_shapes.py [--config.x=y] [--steps=20]

Modes:
  input    input-pipeline examples/s (grain, 0 and N worker processes) next to the examples/s the
           compiled train step consumes on this machine; the pipeline keeps up when the ratio is >= 1.
  step     the device's measured ceilings (matmul FLOP/s in f32 and bf16, memory bytes/s), then the train step
           at the sizes of --widths (model.channels): parameters, step time, FLOPs per step per device (XLA's
           cost analysis of the lowered step, split over the devices: XLA:GPU's count of the compiled one
           misses its cuDNN/cuBLAS calls), achieved FLOP/s, that as a fraction of the ceiling in the model's
           dtype, MFU against the datasheet peak where one is known (GPU/TPU), and a roofline: the bytes one
           device reads and writes per step (XLA's cost analysis of the compiled step), FLOPs per byte, and the
           step time at the compute roof or the memory roof, whichever is longer (datasheet roofs where known,
           else the measured ceilings), and the device's peak memory where it reports one (GPU, TPU).
  roofline the same train step's FLOPs and bytes on one device at the sizes of --widths, compiled here on any
           backend (nothing runs, nothing is allocated: an abstract state), against the datasheet roofs of
           --device_kind: FLOPs per byte, the step time at the longer roof and the MFU that roof allows (with
           model.remat, GFLOP/step and MFU leave out the recomputation, FLOPs per byte and the time do not), and the
           activations the backward pass keeps (kept_activation_bytes: what remat and its policy change). A plan
           for hardware this machine lacks; the bytes are this backend's fusion's (a GPU's or TPU's own are in
           `step` there; XLA:CPU computes bfloat16 in float32, so its bytes of a bfloat16 model run high).
  memory   per-device bytes with FSDP over 1, 2, 4, 8 devices: train state (params + EMA + optimizer
           moments) held by one device vs total / N, the compiled step's argument and temporary bytes from
           XLA's memory analysis, and the activations its backward pass keeps for one device's share of the batch
           (kept_activation_bytes); for a video model also the step's temporary bytes with its frames (Wan's
           tokens) split over 1, 2, 4, 8 devices (mesh.sequence: sequence_table); nothing is allocated (an
           abstract state). On a CPU run it with XLA_FLAGS=--xla_force_host_platform_device_count=8.
  peer     diffusers' PyTorch UNet2DConditionModel at a matched size (our widths, resolution and
           attention levels, the depth whose parameter count is nearest; both counts printed; our
           feed-forward set to diffusers' 4x), or for a DiT config (model.backbone='dit') its
           PixArtTransformer2DModel (our width, heads, patch size; the number of blocks whose parameter
           count is nearest); for Wan's, SD's U-Net, SD3's and Flux's transformer (model.backbone 'wan',
           'sd_unet', 'sd3', 'flux') diffusers' model of the same checkpoint (a latent model on its
           latent.cache's latents): train step time (forward + backward + AdamW) and sampling images/s
           (25-step DPM-Solver++(2M) with classifier-free guidance), ours vs theirs.
           Needs torch and diffusers (`pip install -e '.[test]'`).
  ops      each operation of the model alone (op_bench.py), ours vs PyTorch's kernels, forward and
           forward + backward: for a U-Net 3x3 convolution, group norm + SiLU and attention at each
           level's shape; for a DiT a linear layer, layer norm, the GEGLU feed-forward and attention at
           its patch tokens. Needs torch.
  lora     fine-tuning the config's model in full against a LoRA of rank --lora_rank of its attention
           projections, one that also updates the residual blocks' convolutions (model.lora_convolutions; U-Net
           only), one that also updates the feed-forward projections (model.lora_feed_forward) and one that also
           updates the scale-shift projections (model.lora_modulation):
           trainable parameters, the train state's bytes (trainable weights, EMA copies and optimizer moments
           apart from the frozen weights), step time, FLOPs per step and the compiled step's temporaries. The
           weights are random (no finetune.workdir is read): the step's cost does not depend on their values.
  profile  where the train step's time goes (profiling.py): a profiler trace of --steps steps, each executed
           HLO op's time attributed to a kind (convolution, matmul, reductions, layout copies, elementwise),
           a phase (forward, backward, other) and the JAX primitive it came from.
  compile  what compiling costs against what it buys: the initialisation, the train step and the sampler
           (config.sample, one batch of sample.batch_size), each lowered once, then compiled --repeats times (no
           cache) at XLA's cheapest code generation (backend optimisation level 0, what the tests use) and at its
           default (level 3): StableHLO lines, compile seconds, run time (the step over --steps steps) and after
           how many runs level 3's longer compile pays for itself. Compile time is most of a short job's time
           (and of the tests').
  restore  reading the latest checkpoint of --workdir as sampling and evaluation jobs do (sample.load_checkpoint:
           the first EMA copy and the frozen weights) against reading its whole train state (what resuming
           training reads): bytes restored, seconds and the process's peak resident memory, each in a fresh
           process, --repeats times. --config is not read (the workdir's own config is).
Flags:
  --config   experiment config (overridable with --config.<field>=<value>)
  --steps    batches / train steps (ops: calls of each operation) timed per measurement (default 20)
  --workers  grain worker processes for the second pipeline measurement (default 2)
  --widths   comma-separated model.channels for `step` and `roofline` (default 16,32,64)
  --device_kind  the accelerator of `roofline`: a key of hardware.PEAK_FLOPS (default "NVIDIA H200")
  --plot     with `step` or `roofline`: also a roofline PNG at this path, each width a point (achieved FLOP/s in
             `step`, what the roof allows in `roofline`)
  --lora_rank  the LoRA rank of `lora` (default 8)
  --workdir  the training workdir whose checkpoint `restore` reads (required by it)
  --repeats  compiles per program and level in `compile`; fresh processes per way of reading in `restore` (default 2)
"""

import math
import multiprocessing
import os
import pathlib
import resource
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from diffusion_jax import cli

MODES = ("input", "step", "roofline", "memory", "peer", "ops", "lora", "profile", "compile", "restore")
# Flags that only some modes read: given for another mode they are refused rather than ignored.
MODE_FLAGS = {"widths": ("step", "roofline"), "plot": ("step", "roofline"), "device_kind": ("roofline",),
              "workers": ("input",), "lora_rank": ("lora",), "workdir": ("restore",), "repeats": ("compile", "restore"),
              "config": ("input", "step", "roofline", "memory", "peer", "ops", "lora", "profile", "compile"),
              "steps": ("input", "step", "peer", "ops", "lora", "profile", "compile")}
BACKBONE_NAMES = {"unet": "U-Net", "dit": "DiT", "wan": "Wan transformer", "sd_unet": "SD U-Net",
                  "sd3": "SD3 transformer", "flux": "Flux transformer"}
config_flags.DEFINE_config_file("config", "configs/t2i_shapes.py", "Experiment config file.", lock_config=True)
flags.DEFINE_integer("steps", 20, "Batches / train steps (ops: calls of each operation) timed per measurement.",
                     lower_bound=1)
flags.DEFINE_integer("workers", 2, "Grain worker processes for the second pipeline measurement.", lower_bound=0)
flags.DEFINE_list("widths", ["16", "32", "64"], "model.channels values for the `step` and `roofline` modes.")
flags.register_validator("widths", lambda widths: bool(widths) and all(w.isdigit() and int(w) > 0 for w in widths),
                         "must be comma-separated positive model.channels, e.g. 16,32,64")
flags.DEFINE_string("plot", None, "`step` and `roofline`: also draw the roofline with each width's point into this "
                    "PNG.")
flags.DEFINE_string("device_kind", "NVIDIA H200", "The accelerator whose datasheet roofs the `roofline` mode uses (a "
                    "key of hardware.PEAK_FLOPS).")
flags.DEFINE_integer("lora_rank", 8, "LoRA rank of the `lora` mode.", lower_bound=1)
flags.DEFINE_string("workdir", None, "Training workdir whose latest checkpoint the `restore` mode reads.")
flags.DEFINE_integer("repeats", 2, "Compiles per program and level in the `compile` mode; fresh processes per way of "
                     "reading in the `restore` mode.", lower_bound=1)


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


def compiled_step(config, devices=None):
  """(compiled step, its arguments (state, global batch, optimizer hyper-parameters), mesh, FLOPs per step per
  device) on `devices` (default all)."""
  from diffusion_jax import sharding, train
  from diffusion_jax.data import pipeline

  mesh = sharding.make_mesh(config.mesh, devices=devices)
  state, graphdef = train.init_state(config, mesh)
  batch_np = pipeline.synthetic_batch(config)
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch_np.items()}
  compiled, flops = train.compile_step(config, train.make_train_step(config, graphdef), state, shapes, mesh)
  args = (state, pipeline.to_global(batch_np, sharding.batch_sharding(mesh)), train.place_hparams(config, mesh))
  return compiled, args, mesh, flops


def time_steps(compiled, args: tuple, steps: int):
  """(seconds per step after one warm-up step, the state after them): the state, args[0], is donated."""
  state, rest = args[0], args[1:]
  state, metrics = compiled(state, *rest)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, *rest)
  jax.block_until_ready(metrics)
  return (time.perf_counter() - start) / steps, state


def train_step_examples_per_s(config, steps: int) -> float:
  compiled, args, _, _ = compiled_step(config)
  return config.train.batch_size / time_steps(compiled, args, steps)[0]


def input_table(config, steps: int, workers: int) -> str:
  consumed = train_step_examples_per_s(config, max(steps // 4, 2))
  rows = [("train step consumes", consumed, 1.0)]
  for w in (0, workers):
    produced = pipeline_examples_per_s(config, w, steps)
    rows.append((f"pipeline, {w} workers", produced, produced / consumed))
  lines = ["| what | examples/s | / train step |", "|---|---|---|"]
  lines += [f"| {name} | {rate:.1f} | {ratio:.2f} |" for name, rate, ratio in rows]
  return "\n".join(lines)


def write_roofline_plot(path, title: str, compute_roof: float, memory_roof: float, points) -> pathlib.Path:
  """A log-log roofline PNG at `path`: attainable FLOP/s against FLOPs per byte under the two roofs (FLOP/s,
  bytes/s), and `points`, [(label, FLOPs per byte, FLOP/s)], marked and labelled."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  ridge = compute_roof / memory_roof
  intensities = [x for _, x, _ in points if math.isfinite(x)]
  x = np.geomspace(min(intensities + [ridge]) / 10, max(intensities + [ridge]) * 10, 200)
  figure, axis = plt.subplots(figsize=(6, 4))
  axis.loglog(x, np.minimum(compute_roof, x * memory_roof), "k-", label="roof")
  axis.axvline(ridge, color="0.7", linestyle=":", label=f"ridge {ridge:.0f} FLOP/byte")
  for label, intensity, flops in points:
    axis.loglog([intensity], [flops], "o")
    axis.annotate(label, (intensity, flops), textcoords="offset points", xytext=(5, -12), fontsize=8)
  axis.set(xlabel="FLOPs per byte", ylabel="FLOP/s per device", title=title)
  axis.legend(fontsize=8)
  figure.tight_layout()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(path, dpi=100)
  plt.close(figure)
  return path


def peak_memory() -> str:
  """The most memory the first device has held so far in this process, in GB (GPUs and TPUs report it; a CPU
  does not: "n/a"). A peak over every row run before, so compare settings one run each."""
  stats = jax.devices()[0].memory_stats() or {}
  return f"{stats['peak_bytes_in_use'] / 1e9:.3g}" if "peak_bytes_in_use" in stats else "n/a"


def step_table(config, steps: int, widths, plot=None) -> str:
  """Ceiling rows, then one row per U-Net width, with its roofline: the time the step's FLOPs take at the compute
  roof or its bytes at the memory roof, whichever is longer (datasheet roofs where known, else measured); with
  `plot` (a path) also the roofline PNG with each width's achieved FLOP/s."""
  from diffusion_jax import hardware, train

  device_count = jax.device_count()
  ceiling = {dtype: hardware.measured_matmul_flops(dtype=getattr(jnp, dtype)) / device_count
             for dtype in ("float32", "bfloat16")}
  bandwidth = hardware.measured_bandwidth() / device_count
  datasheet = hardware.datasheet()
  lines = [f"measured ceilings per device: matmul f32 {ceiling['float32'] / 1e9:.1f} GFLOP/s, bf16 "
           f"{ceiling['bfloat16'] / 1e9:.1f} GFLOP/s; memory {bandwidth / 1e9:.1f} GB/s"
           + (f"; datasheet {datasheet[0] / 1e12:.0f} TFLOP/s, {datasheet[1] / 1e12:.2f} TB/s" if datasheet else ""),
           "",
           "| channels | parameters | step ms | GFLOP/step | GFLOP/s per device | / ceiling (model dtype) | MFU "
           "| GB/step (XLA) | FLOP/byte | roofline ms | peak memory (GB) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  compute_roof, memory_roof = datasheet or (ceiling[config.model.dtype], bandwidth)
  points = []
  for width in widths:
    sized = config.copy_and_resolve_references()
    sized.model.channels = int(width)
    compiled, args, _, flops = compiled_step(sized)
    traffic = train.program_bytes(compiled)
    seconds, state = time_steps(compiled, args, steps)
    achieved = flops / seconds
    mfu = f"{achieved / datasheet[0]:.1%}" if datasheet else "n/a (no datasheet)"
    points.append((f"width {width}", flops / traffic, achieved))
    bound = max((flops / compute_roof, "compute"), (traffic / memory_roof, "memory"))
    lines.append(f"| {width} | {train.count_params(state.params) / 1e6:.2f}M | {seconds * 1e3:.0f} | "
                 f"{flops / 1e9:.5g} | {achieved / 1e9:.3g} | {achieved / ceiling[sized.model.dtype]:.0%} | {mfu} | "
                 f"{traffic / 1e9:.4g} | {flops / traffic:.0f} | {bound[0] * 1e3:.0f} ({bound[1]}) | "
                 f"{peak_memory()} |")
  if plot:
    drawn = write_roofline_plot(plot, jax.devices()[0].device_kind, compute_roof, memory_roof, points)
    lines.append(f"\nroofline plot: {drawn}")
  return "\n".join(lines)


def kept_activation_bytes(config) -> float:
  """Bytes the train step's backward pass keeps from its forward pass for one device's batch of
  train.batch_size: the residuals of jax.vjp of the training loss, less the trained parameters' bytes (which the
  step holds anyway), from shapes alone. What model.remat and model.remat_policy change, on any backend (XLA:CPU's
  memory analysis of the compiled step hardly shows it)."""
  from diffusion_jax import sharding, train
  from diffusion_jax.data import pipeline

  config = config.copy_and_resolve_references()
  config.mesh.update(data=1, fsdp=1, sequence=1, tensor=1)  # one device's share: shapes only, so any config's
  state, graphdef = train.abstract_state(config, sharding.make_mesh(config.mesh, devices=jax.devices()[:1]))
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in pipeline.synthetic_batch(config).items()}
  loss_fn = train.make_loss_fn(config, graphdef)

  def residuals(params, frozen, batch):
    return jax.vjp(lambda p: loss_fn(p, frozen, batch, jax.random.key(0), None)[0], params)[1]

  nbytes = lambda tree: sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))
  kept = jax.eval_shape(residuals, state.params, state.frozen, batch)
  return nbytes(kept) - nbytes(state.params)


def roofline_table(config, widths, device_kind: str, plot=None) -> str:
  """One row per U-Net width: the step's FLOPs and bytes on one device (lowered and compiled here for an abstract
  state; nothing runs) against `device_kind`'s datasheet roofs; with `plot` (a path) also the roofline PNG with each
  width at the FLOP/s its roof allows."""
  from diffusion_jax import hardware, sharding, train

  if device_kind not in hardware.PEAK_FLOPS:
    raise ValueError(f"--device_kind={device_kind!r} has no datasheet here; known: {', '.join(hardware.PEAK_FLOPS)}")
  peak, bandwidth = hardware.PEAK_FLOPS[device_kind], hardware.PEAK_BANDWIDTH[device_kind]
  lines = [f"{device_kind} datasheet: {peak / 1e12:.0f} TFLOP/s, {bandwidth / 1e12:.2f} TB/s (ridge "
           f"{peak / bandwidth:.0f} FLOP/byte); bytes as XLA:{jax.devices()[0].platform.upper()} fuses the step", "",
           "| channels | parameters | GFLOP/step | GB/step | FLOP/byte | roofline ms | MFU bound | kept activations "
           "(GB) |", "|---|---|---|---|---|---|---|---|"]
  points = []
  for width in widths:
    sized = config.copy_and_resolve_references()
    sized.model.channels = int(width)
    mesh = sharding.make_mesh(sized.mesh, devices=jax.devices()[:1])
    lowered, state = train.lower_abstract_step(sized, mesh)
    work, traffic = train.flops_per_device(lowered, mesh), train.program_bytes(lowered.compile())
    flops = train.flops_on_cpu(sized) if sized.model.remat else work  # less remat's recomputation
    seconds = max(work / peak, traffic / bandwidth)
    points.append((f"width {width}", work / traffic, work / seconds))
    lines.append(f"| {width} | {train.count_params(state.params) / 1e6:.2f}M | {flops / 1e9:.5g} | "
                 f"{traffic / 1e9:.4g} | {work / traffic:.0f} | {seconds * 1e3:.1f} | {flops / seconds / peak:.0%} | "
                 f"{kept_activation_bytes(sized) / 1e9:.4g} |")
  if plot:
    title = f"{device_kind} (bytes as XLA:{jax.devices()[0].platform.upper()} fuses the step)"
    lines.append(f"\nroofline plot: {write_roofline_plot(plot, title, peak, bandwidth, points)}")
  return "\n".join(lines)


def peer_table(config, steps: int, sampler_steps: int = 25, sample_batch: int = 8) -> str:
  """Our train step and sampler against diffusers' PyTorch U-Net (or, for a DiT config, its PixArt transformer;
  for Wan's, diffusers' Wan transformer of the same checkpoint; SD's, SD3's and Flux's theirs) at a matched size, on
  this machine. A latent model is timed on its latent cache's latents (ours also decodes its samples)."""
  import torch

  from diffusion_jax import diffusers_peer, sample, train
  from diffusion_jax.data import pipeline
  from diffusion_jax.models import autoencoder, text_to_image
  from diffusion_jax.text import tokenizers

  config = config.copy_and_resolve_references()
  if text_to_image.image_to_video(config):
    raise ValueError("bench peer: an image-to-video Wan's condition and image tokens have no matched diffusers step "
                     "here yet; give a text-to-video Wan (model.wan_path)")
  backbone = config.model.backbone
  if backbone == "unet":
    config.model.ff_mult = 4  # diffusers' U-Net transformer blocks have a 4x (GEGLU) feed-forward
  if config.latent.autoencoder_path and not config.latent.cache:
    raise ValueError("bench peer times the network on what it diffuses: a latent model's train step would also run "
                     "its autoencoder on the pixels, which the peer does not; give it a latent.cache (or a pixel "
                     "config)")
  b, size, tokens = config.train.batch_size, pipeline.image_size(config.data), config.text.max_length
  if config.latent.autoencoder_path:  # the peer runs on the latents the cache holds
    size = autoencoder.latent_shape(config.latent.autoencoder_path, *size)[:2]
  wan = config.model.backbone == "wan"  # a video peer: diffusers' U-Net and PixArt peers take images
  frames = config.data.frames if wan else 1
  clip, unit = (f"{frames} frames of ", "clips") if wan else ("", "images")
  compiled, args, mesh, _ = compiled_step(config)
  ours_params = train.count_params(args[0].params[backbone])
  ours_step, state = time_steps(compiled, args, steps)
  peer = diffusers_peer.closest(config.model, size[0], ours_params)
  theirs_step = diffusers_peer.train_step_seconds(peer, b, size, tokens, steps, config.model.dtype, frames)

  sample_config = config.sample.copy_and_resolve_references()
  sample_config.update(sampler="dpmpp_2m", steps=sampler_steps, guidance_scale=3.0, num_per_prompt=1)
  graphdef = text_to_image.split(text_to_image.abstract(config), config)[0]  # sampling reuses the timed state
  generate = lambda: sample.generate(config, graphdef, state.params, state.frozen, tokenizers.from_config(config),
                                     ["a large red circle"] * sample_batch, sample_config, mesh)
  generate()  # compile
  start = time.perf_counter()
  for _ in range(2):
    generate()
  ours_sampling = 2 * sample_batch / (time.perf_counter() - start)
  theirs_sampling = diffusers_peer.sampling_images_per_s(peer, sample_batch, size, tokens, sampler_steps, 3.0,
                                                         dtype=config.model.dtype, frames=frames)
  lines = [f"peer: diffusers {diffusers_peer.name(peer, backbone)}, torch {torch.__version__} on "
           f"{diffusers_peer.described(diffusers_peer.device())}; ours: jax {jax.__version__} on "
           f"{jax.devices()[0].device_kind} ({config.model.dtype})", "",
           "| | ours (JAX) | diffusers (PyTorch) | ours / diffusers |", "|---|---|---|---|",
           f"| {BACKBONE_NAMES[backbone]} parameters | {ours_params / 1e6:.3f}M | "
           f"{diffusers_peer.count(peer) / 1e6:.3f}M | {ours_params / diffusers_peer.count(peer):.3f} |",
           f"| train step (batch {b}, {clip}{size[0]} x {size[1]} px), ms | {ours_step * 1e3:.0f} | "
           f"{theirs_step * 1e3:.0f} | speed {theirs_step / ours_step:.2f} |",
           f"| sampling, {sampler_steps}-step DPM-Solver++(2M) + guidance (batch {sample_batch}), {unit}/s | "
           f"{ours_sampling:.2f} | {theirs_sampling:.2f} | speed {ours_sampling / theirs_sampling:.2f} |"]
  return "\n".join(lines)


def state_bytes_on_one_device(state) -> tuple[int, int]:
  """(bytes of the train state one device holds, total bytes of the train state) of an abstract state
  (ShapeDtypeStructs with shardings): what its shardings place, with nothing allocated."""
  leaves = jax.tree.leaves(state)
  held = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in leaves)
  return held, sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves)


def memory_table(config, device_counts=(1, 2, 4, 8)) -> str:
  """Per-device bytes under FSDP from the shardings and XLA's memory analysis of the compiled step; no state
  is initialised, so a config larger than this machine's memory is measured too."""
  from diffusion_jax import sharding, train

  lines = ["| FSDP devices | state on one device (MB) | total / N (MB) | ratio | step arguments (MB) | "
           "step temporaries (MB) | kept activations (MB) |", "|---|---|---|---|---|---|---|"]
  for n in device_counts:
    if n > jax.device_count():
      lines.append(f"| {n} | needs {n} devices (XLA_FLAGS=--xla_force_host_platform_device_count=8) | | | | | |")
      continue
    sized = config.copy_and_resolve_references()
    sized.mesh.update(data=1, fsdp=n, sequence=1, tensor=1)
    lowered, state = train.lower_abstract_step(sized, sharding.make_mesh(sized.mesh, devices=jax.devices()[:n]))
    compiled = lowered.compile()
    held, total = state_bytes_on_one_device(state)
    memory = compiled.memory_analysis()
    per_device = sized.copy_and_resolve_references()
    per_device.train.batch_size = max(1, config.train.batch_size // n)
    lines.append(f"| {n} | {held / 1e6:.2f} | {total / n / 1e6:.2f} | {held / (total / n):.3f} | "
                 f"{memory.argument_size_in_bytes / 1e6:.2f} | {memory.temp_size_in_bytes / 1e6:.1f} | "
                 f"{kept_activation_bytes(per_device) / 1e6:.1f} |")
  return "\n".join(lines)


def sequence_table(config, device_counts=(1, 2, 4, 8)) -> str:
  """A video model's per-device temporary bytes of the compiled step (XLA's memory analysis) with its frames (Wan's
  tokens) split over 1, 2, 4, 8 devices (mesh.sequence; the whole batch on each), from an abstract state."""
  from diffusion_jax import config_checks, sharding, train

  lines = ["| sequence devices | step temporaries (MB) | / one device's |", "|---|---|---|"]
  one = None
  for n in device_counts:
    if n > jax.device_count():
      lines.append(f"| {n} | needs {n} devices (XLA_FLAGS=--xla_force_host_platform_device_count=8) | |")
      continue
    sized = config.copy_and_resolve_references()
    sized.mesh.update(data=1, fsdp=1, sequence=n, tensor=1)
    if problems := config_checks.sequence_problems(sized, n):
      lines.append(f"| {n} | {'; '.join(problems)} | |")
      continue
    lowered, _ = train.lower_abstract_step(sized, sharding.make_mesh(sized.mesh, devices=jax.devices()[:n]))
    temporaries = lowered.compile().memory_analysis().temp_size_in_bytes
    one = one or temporaries
    lines.append(f"| {n} | {temporaries / 1e6:.1f} | {temporaries / one:.2f} |")
  return "\n".join(lines)


def lora_table(config, steps: int, rank: int) -> str:
  """One row per way of fine-tuning the config's model: in full, a LoRA of rank `rank`, the same with the
  convolutions (U-Net only), the same with the feed-forward projections, the same with the scale-shift
  projections."""
  from diffusion_jax import train

  ways = [("full fine-tune", {}), (f"LoRA rank {rank}, attention", {"lora_rank": rank})]
  if config.model.backbone == "unet":
    ways.append((f"LoRA rank {rank}, attention + convolutions", {"lora_rank": rank, "lora_convolutions": True}))
  ways.append((f"LoRA rank {rank}, attention + feed-forward", {"lora_rank": rank, "lora_feed_forward": True}))
  ways.append((f"LoRA rank {rank}, attention + modulation", {"lora_rank": rank, "lora_modulation": True}))
  mb = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)) / 1e6
  lines = ["| fine-tune | trainable parameters | trainable state (MB) | frozen (MB) | step ms | GFLOP/step | "
           "step temporaries (MB) |", "|---|---|---|---|---|---|---|"]
  for name, model in ways:
    sized = config.copy_and_resolve_references()
    sized.model.update(model)
    compiled, args, _, flops = compiled_step(sized)
    state = args[0]
    trainable, frozen = mb((state.params, state.ema, state.opt_state)), mb(state.frozen)
    parameters, temporaries = train.count_params(state.params), compiled.memory_analysis().temp_size_in_bytes / 1e6
    seconds, _ = time_steps(compiled, args, steps)
    lines.append(f"| {name} | {parameters:,} | {trainable:.2f} | {frozen:.2f} | {seconds * 1e3:.0f} | "
                 f"{flops / 1e9:.4g} | {temporaries:.1f} |")
  return "\n".join(lines)


def profile_table(config, steps: int) -> str:
  from diffusion_jax import profiling

  compiled, args, _, _ = compiled_step(config)
  by_source, wall = profiling.profile(compiled, args, steps, advance=lambda args, out: (out[0], *args[1:]))
  return profiling.table(by_source, wall)


def compile_seconds(lowered, level: int, repeats: int):
  """(seconds of each of `repeats` compiles of `lowered` at XLA backend optimisation level `level`, the compiled
  program). Each compile is a real one: JAX's in-memory caches are cleared before it and its persistent cache is
  off during it (a compile read from disk is not a compile)."""
  from jax.experimental.compilation_cache import compilation_cache as persistent_cache

  seconds, persistent = [], jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  persistent_cache.reset_cache()  # JAX decides once per process whether it uses the cache: it decides anew
  try:
    for _ in range(repeats):
      jax.clear_caches()
      start = time.perf_counter()
      compiled = lowered.compile(compiler_options={"xla_backend_optimization_level": level})
      seconds.append(time.perf_counter() - start)
  finally:
    jax.config.update("jax_enable_compilation_cache", persistent)
    persistent_cache.reset_cache()
  return seconds, compiled


def pays_off_after(compile_cheap: float, compile_full: float, run_cheap: float, run_full: float) -> str:
  """After how many runs full optimisation's longer compile is paid back by its faster runs."""
  if run_full >= run_cheap:
    return "never (not faster)"
  runs = max(math.ceil((compile_full - compile_cheap) / (run_cheap - run_full)), 1)
  return f"{runs:,} run{'s' * (runs > 1)}"


def compile_table(config, steps: int, repeats: int) -> str:
  """The `compile` mode's table: the initialisation, the train step and the sampler (config.sample, one batch),
  each lowered once, then compiled at XLA's cheapest code generation (level 0, what the tests use) and at its
  default (level 3) and run."""
  from diffusion_jax import sample, sharding, train
  from diffusion_jax.data import pipeline
  from diffusion_jax.models import text_to_image
  from diffusion_jax.text import tokenizers

  mesh = sharding.make_mesh(config.mesh)
  state, graphdef = train.init_state(config, mesh)
  _, params, frozen = text_to_image.split(text_to_image.abstract(config), config)
  key = jax.random.key(config.seed)
  init = train.weights_init(config, (sharding.state_shardings(params, mesh), sharding.state_shardings(frozen, mesh)))
  batch_np = pipeline.synthetic_batch(config)
  batch = pipeline.to_global(batch_np, sharding.batch_sharding(mesh))
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch_np.items()}
  step = train.lower_step(train.make_train_step(config, graphdef), state, shapes, mesh)
  hparams = train.place_hparams(config, mesh)
  samples = -(-config.sample.batch_size // mesh.size) * mesh.size  # as sample.generate rounds it
  ids, mask = tokenizers.from_config(config)(["a large red circle"] * samples)
  prompts = jax.device_put((sample.example_keys(range(samples), 1), ids, mask), sharding.batch_sharding(mesh))
  sampler = sample.compiled_sampler(config, graphdef, config.sample, mesh)

  def call_seconds(call):
    jax.block_until_ready(call())  # warm-up
    start = time.perf_counter()
    jax.block_until_ready(call())
    return time.perf_counter() - start

  def step_seconds(compiled):
    nonlocal state
    seconds, state = time_steps(compiled, (state, batch, hparams), steps)  # the state is donated: carried on
    return seconds

  programs = (("initialisation", init.lower(key), lambda compiled: call_seconds(lambda: compiled(key))),
              ("train step", step, step_seconds),
              (f"sampling ({config.sample.steps}-step {config.sample.sampler}, {samples} samples)",
               sampler.lower(state.params, state.frozen, *prompts),
               lambda compiled: call_seconds(lambda: compiled(state.params, state.frozen, *prompts))))
  span = lambda values: "-".join(f"{v:.2f}" for v in sorted({min(values), max(values)}))
  arrays = len(jax.tree.leaves(state.params))
  lines = [f"{train.count_params(state.params):,} trained parameters in {arrays} arrays; XLA_FLAGS="
           f"{os.environ.get('XLA_FLAGS', '')!r}; compile seconds of {repeats} compile{'s' * (repeats > 1)} per "
           "program and level (fastest-slowest)", "",
           "| program | StableHLO lines | compile s, level 0 | compile s, level 3 | run ms, level 0 | "
           "run ms, level 3 | level 3 pays off after |", "|---|---|---|---|---|---|---|"]
  for name, lowered, run in programs:
    compiles, runs = [], []
    for level in (0, 3):
      seconds, compiled = compile_seconds(lowered, level, repeats)
      compiles.append(seconds)
      runs.append(run(compiled))
    lines.append(f"| {name} | {lowered.as_text().count(chr(10)):,} | {span(compiles[0])} | {span(compiles[1])} | "
                 f"{runs[0] * 1e3:.1f} | {runs[1] * 1e3:.1f} | "
                 f"{pays_off_after(min(compiles[0]), min(compiles[1]), *runs)} |")
  return "\n".join(lines)


def restore_cost(workdir: str, whole: bool) -> tuple[float, int, int]:
  """(seconds, bytes restored, this process's peak resident bytes) of reading the latest checkpoint of `workdir`:
  its whole train state, or (not whole) the sampling weights alone. Run in a fresh process."""
  from diffusion_jax import checkpoint, sample, sharding, train

  start = time.perf_counter()
  if whole:
    config = checkpoint.read_config(workdir)
    target, _ = train.abstract_state(config, sharding.make_mesh(sharding.SAMPLING_MESH))
    restored, _ = checkpoint.restore(checkpoint.manager(workdir, read_only=True), target)
  else:
    restored = tuple(sample.load_checkpoint(workdir)[1])
  jax.block_until_ready(restored)
  seconds = time.perf_counter() - start
  held = sum(x.nbytes for x in jax.tree.leaves(restored))
  return seconds, held, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def restore_table(workdir: str, repeats: int) -> str:
  """The `restore` mode's table: each way of reading in `repeats` fresh (spawned) processes, alternating."""
  from diffusion_jax import checkpoint

  if not checkpoint.manager(workdir, read_only=True).all_steps():
    raise ValueError(f"--workdir={workdir!r} has no checkpoint to read; train first.")
  results = {False: [], True: []}
  context = multiprocessing.get_context("spawn")  # a fresh process: its peak memory is this restore's
  for _ in range(repeats):
    for whole in results:
      with context.Pool(1) as pool:
        results[whole].append(pool.apply(restore_cost, (workdir, whole)))
  lines = ["| read | restored (MB) | seconds | peak resident memory (GB) |", "|---|---|---|---|"]
  span = lambda values, scale, digits: "-".join(f"{v / scale:.{digits}f}" for v in sorted({min(values), max(values)}))
  for whole, runs in results.items():
    seconds, held, peak = zip(*runs)
    lines.append(f"| {'whole train state (resuming)' if whole else 'sampling weights (load_checkpoint)'} | "
                 f"{span(held, 1e6, 2)} | {span(seconds, 1, 2)} | {span(peak, 1e9, 2)} |")
  return "\n".join(lines)


def main(argv):
  if len(argv) != 2 or argv[1] not in MODES:
    raise app.UsageError(f"usage: python -m diffusion_jax.bench MODE --config=... (modes: {', '.join(MODES)})")
  with cli.refusals():
    for flag, modes in MODE_FLAGS.items():
      if argv[1] not in modes:
        cli.refuse((flag,), f"not used by the {argv[1]} mode (only by {', '.join(modes)})")
  f = flags.FLAGS
  if argv[1] == "restore" and not f.workdir:
    raise app.UsageError("the restore mode reads a checkpoint: give --workdir=DIR (a training workdir)")
  from diffusion_jax.data import pipeline
  height, width = pipeline.image_size(f.config.data)
  what = f.workdir if argv[1] == "restore" else f"batch {f.config.train.batch_size}, {height} x {width} px"
  print(f"# {argv[1]} benchmark, {jax.device_count()} x {jax.devices()[0].device_kind}, {what}, "
        f"{time.strftime('%Y-%m-%d')}")
  from diffusion_jax import config_checks

  try:
    if argv[1] != "restore":
      config_checks.validate(f.config)
    print_table(argv[1], f)
  except ValueError as error:  # configuration errors a user can fix
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


def print_table(mode, f):
  if mode == "input":
    print(input_table(f.config, f.steps, f.workers))
  elif mode == "step":
    print(step_table(f.config, f.steps, f.widths, f.plot))
  elif mode == "roofline":
    print(roofline_table(f.config, f.widths, f.device_kind, f.plot))
  elif mode == "peer":
    print(peer_table(f.config, f.steps))
  elif mode == "ops":
    from diffusion_jax import op_bench
    print(op_bench.table(f.config, f.steps))
  elif mode == "lora":
    print(lora_table(f.config, f.steps, f.lora_rank))
  elif mode == "profile":
    print(profile_table(f.config, f.steps))
  elif mode == "compile":
    print(compile_table(f.config, f.steps, f.repeats))
  elif mode == "restore":
    print(restore_table(f.workdir, f.repeats))
  else:
    print(memory_table(f.config))
    if f.config.model.temporal:
      print("\nSequence parallelism (mesh.sequence):\n" + sequence_table(f.config))


if __name__ == "__main__":
  cli.run(main, config_kinds={"config": "experiment"})
