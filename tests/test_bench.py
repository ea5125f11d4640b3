"""The benchmark command builds its tables from real measurements (no timing is asserted)."""

import importlib.metadata
import os
import pathlib
import re
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from conftest import tiny_config
from diffusion_jax import bench


def cells(row):
  return [c.strip() for c in row.strip("|").split("|")]


def tiny_dit_config(tmp_path_factory):
  config = tiny_config(tmp_path_factory)
  config.model.update(backbone="dit", channels=16, depth=2, patch_size=2)
  config.train.batch_size = 8  # the peer benchmark's: its DiT step compiles once
  return config


def test_input_benchmark_table(tmp_path_factory):
  table = bench.input_table(tiny_dit_config(tmp_path_factory), steps=4, workers=0).splitlines()
  assert table[0] == "| what | examples/s | / train step |" and len(table) == 5
  for row in table[2:]:
    assert float(row.split("|")[2]) > 0


def test_step_benchmark_flops_grow_about_quadratically_with_width(tmp_path_factory):
  # The benchmark is the same for either backbone; a DiT compiles in half the U-Net's time.
  lines = bench.step_table(tiny_dit_config(tmp_path_factory), steps=1, widths=["32", "64"]).splitlines()
  assert lines[0].startswith("measured ceilings per device: matmul f32")
  rows = [cells(r) for r in lines[4:]]
  flops = [float(r[3]) for r in rows]
  assert [r[0] for r in rows] == ["32", "64"] and all(float(r[4]) > 0 for r in rows)
  # At these widths the linear layers dominate: doubling the width multiplies FLOPs by between 2.5 and 4.
  assert 2.5 < flops[1] / flops[0] < 4.2
  # The roofline: bytes per step from the compiled step, FLOPs per byte from the two, the longer roof's time.
  traffic = [float(r[7]) for r in rows]
  assert all(t > 0 for t in traffic)
  assert [float(r[8]) for r in rows] == pytest.approx([f / t for f, t in zip(flops, traffic)], rel=0.1, abs=1)
  assert all(re.fullmatch(r"\d+ \((compute|memory)\)", r[9]) for r in rows)
  assert all(r[10] == "n/a" for r in rows)  # a CPU reports no peak memory


def test_roofline_benchmark_takes_the_longer_roof_of_a_device_this_machine_lacks(tmp_path_factory):
  """Each row's FLOPs per byte, roof time and MFU bound agree with its FLOPs and bytes, and a plot is drawn; with
  remat, the model's FLOPs are those of the step without it, and the backward pass keeps fewer activations."""
  import PIL.Image

  from diffusion_jax import hardware

  config = tiny_dit_config(tmp_path_factory)
  plot = tmp_path_factory.mktemp("roofline") / "h100.png"
  lines = bench.roofline_table(config, ["32", "64"], "NVIDIA H100", plot).splitlines()
  assert lines[0].startswith("NVIDIA H100 datasheet: 989 TFLOP/s, 3.35 TB/s (ridge 295 FLOP/byte)")
  assert lines[-1] == f"roofline plot: {plot}" and PIL.Image.open(plot).size == (600, 400)
  rows = [[float(c.rstrip("M%")) for c in cells(r)] for r in lines[4:6]]
  assert [r[0] for r in rows] == [32, 64]
  peak, bandwidth = hardware.PEAK_FLOPS["NVIDIA H100"], hardware.PEAK_BANDWIDTH["NVIDIA H100"]
  for _, _, gflop, gigabytes, intensity, ms, mfu, kept in rows:
    assert intensity == pytest.approx(gflop / gigabytes, rel=0.05, abs=1)
    assert ms == pytest.approx(max(gflop / peak, gigabytes / bandwidth) * 1e12, rel=0.05, abs=0.1)
    assert 0 < mfu <= 100 and kept > 0
  remat = config.copy_and_resolve_references()
  remat.model.remat = True  # the lowered step with remat counts about 20% more here
  row = [float(c.rstrip("M%")) for c in cells(bench.roofline_table(remat, ["32"], "NVIDIA H100").splitlines()[4])]
  assert row[2] == pytest.approx(rows[0][2], rel=0.02) and row[7] < 0.5 * rows[0][7]
  with pytest.raises(ValueError, match="--device_kind='NVIDIA B200' has no datasheet here; known: TPU v4"):
    bench.roofline_table(config, ["32"], "NVIDIA B200")


def test_remat_policy_matmuls_keeps_convolutions_and_projections_at_a_few_percent_of_recomputation(tmp_path_factory):
  """model.remat_policy: 'full' recomputes each block (the step does about 20% more work here) and keeps the fewest
  activations; 'matmuls' keeps its convolutions' and projections' outputs, so it recomputes little (3.5% more work
  here) and keeps more than 'full', far less than no remat."""
  from diffusion_jax import sharding, train

  config = tiny_config(tmp_path_factory)
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  work, kept = {}, {}
  for remat, policy in ((False, "full"), (True, "full"), (True, "matmuls")):
    config.model.update(remat=remat, remat_policy=policy)
    work[remat, policy] = train.flops_per_device(train.lower_abstract_step(config, mesh)[0], mesh)
    kept[remat, policy] = bench.kept_activation_bytes(config)
  plain = work[False, "full"]
  assert plain <= work[True, "matmuls"] < 1.05 * plain and work[True, "full"] > 1.1 * plain, work
  assert kept[True, "full"] < kept[True, "matmuls"] < 0.5 * kept[False, "full"], kept


def test_memory_benchmark_fsdp_divides_the_state(tmp_path_factory):
  config = tiny_dit_config(tmp_path_factory)
  rows = [cells(r) for r in bench.memory_table(config, device_counts=(1, 8)).splitlines()[2:]]
  assert [r[0] for r in rows] == ["1", "8"] and float(rows[0][3]) == 1.0
  assert float(rows[1][3]) <= 1.1, f"FSDP over 8 devices keeps {rows[1][3]} x total/8 per device"
  assert float(rows[1][1]) < float(rows[0][1]) / 6 and float(rows[1][5]) > 0
  assert 0 < float(rows[1][6]) < float(rows[0][6]) / 4  # an eighth of the batch on each device


def test_memory_benchmark_of_a_video_model_splits_its_frames_over_sequence_devices():
  """The video DiT of t2v_moving_shapes:test (4 frames a clip): temporaries fall with 2 and 4 sequence devices; 8
  do not divide the frames and say so."""
  from configs import t2v_moving_shapes

  config = t2v_moving_shapes.get_config("test")
  config.model.update(backbone="dit", channels=16, depth=2, patch_size=2)
  rows = [cells(r) for r in bench.sequence_table(config).splitlines()[2:]]
  assert [r[0] for r in rows] == ["1", "2", "4", "8"] and float(rows[0][2]) == 1.0
  assert 1 > float(rows[1][2]) > float(rows[2][2])
  assert "a clip's 4 frames must be a multiple of mesh.sequence=8" in rows[3][1]


def test_the_peer_of_wans_transformer_is_the_same_checkpoint_run_by_diffusers_on_clips(tmp_path):
  """The Wan peer is diffusers' WanTransformer3DModel with the checkpoint's weights (our parameter count), timed on
  clips [batch, channels, frames, h, w]."""
  from flax import nnx

  from diffusion_jax import diffusers_peer
  from diffusion_jax.models import wan_transformer
  from test_wan_transformer import save_tiny_wan

  save_tiny_wan(tmp_path)
  peer = diffusers_peer.closest(ml_collections.ConfigDict(dict(backbone="wan", wan_path=str(tmp_path))), 16, 0)
  ours = sum(p.size for p in jax.tree.leaves(nnx.state(wan_transformer.load_diffusers(tmp_path))))
  assert diffusers_peer.count(peer) == ours and diffusers_peer.name(peer, "wan").startswith(
      "WanTransformer3DModel, the same")
  assert diffusers_peer.input_shape(peer, 2, 16, 4) == (2, 3, 4, 16, 16)
  assert diffusers_peer.train_step_seconds(peer, 2, 16, 8, steps=1, frames=4) > 0
  assert diffusers_peer.sampling_images_per_s(peer, 1, 16, 8, 2, 3.0, repeats=1, frames=4) > 0


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
def test_the_peer_of_stable_diffusions_unet_is_the_same_checkpoint_run_by_diffusers(tmp_path, sdxl):
  """The SD U-Net's peer is diffusers' UNet2DConditionModel with the checkpoint's weights: the same function of the
  same weights as ours (SDXL's: given zeros as its pooled embedding and ones as its time ids), so the benchmark times
  one network two ways."""
  import torch

  from diffusion_jax import diffusers_peer
  from diffusion_jax.models import sd_unet
  from test_sd_unet import POOLED, save_tiny_sd_unet

  save_tiny_sd_unet(tmp_path, sdxl=sdxl)
  peer = diffusers_peer.closest(ml_collections.ConfigDict(dict(backbone="sd_unet", sd_unet_path=str(tmp_path))), 16, 0)
  assert diffusers_peer.name(peer, "sd_unet").startswith("UNet2DConditionModel, the same checkpoint")
  x, text = np.random.default_rng(0).standard_normal((1, 4, 16, 16)), np.ones((1, 3, 16))
  with torch.no_grad():
    expected = diffusers_peer.denoise(peer.eval(), torch.tensor(x, dtype=torch.float32), torch.tensor([500.0]),
                                      torch.tensor(text, dtype=torch.float32)).numpy()
  added = (np.zeros((1, POOLED)), np.ones((1, 6))) if sdxl else ()
  ours = sd_unet.load_diffusers(tmp_path)(x.transpose(0, 2, 3, 1), np.array([500.0]), text, *added)
  np.testing.assert_allclose(np.asarray(ours).transpose(0, 3, 1, 2), expected, atol=2e-5)
  assert diffusers_peer.train_step_seconds(peer, 2, 16, 3, steps=1) > 0


@pytest.mark.parametrize("backbone", ["sd3", "flux"])
def test_the_peer_of_sd3s_and_fluxs_transformer_is_the_same_checkpoint_run_by_diffusers(tmp_path, backbone):
  """SD3's and Flux's peers are diffusers' SD3Transformer2DModel and FluxTransformer2DModel with the checkpoint's
  weights: the same function of the same weights as ours (given zeros as the pooled embedding; Flux its latents
  packed as its pipeline packs them, guidance 3.5), so the benchmark times one network two ways; a latent model
  without a latent cache is refused (its step would also run the autoencoder)."""
  import torch

  from configs import t2i_shapes
  from diffusion_jax import diffusers_peer
  from diffusion_jax.models import flux_transformer, sd3_transformer
  from test_flux import save_tiny_flux_transformer
  from test_sd3 import save_tiny_sd3_transformer

  (save_tiny_sd3_transformer if backbone == "sd3" else save_tiny_flux_transformer)(tmp_path)
  peer = diffusers_peer.closest(ml_collections.ConfigDict({"backbone": backbone, f"{backbone}_path": str(tmp_path)}),
                                16, 0)
  assert diffusers_peer.name(peer, backbone).startswith(f"{type(peer).__name__}, the same checkpoint (num_layers=2")
  assert diffusers_peer.input_shape(peer, 2, 16, 1) == (2, 4, 16, 16)
  x, text = np.random.default_rng(0).standard_normal((1, 4, 8, 12)), np.ones((1, 3, 40))
  with torch.no_grad():
    expected = diffusers_peer.denoise(peer.eval(), torch.tensor(x, dtype=torch.float32), torch.tensor([500.0]),
                                      torch.tensor(text, dtype=torch.float32)).numpy()
  inputs = (x.transpose(0, 2, 3, 1), np.array([500.0]), text, np.zeros((1, 16)))
  ours = (sd3_transformer.load_diffusers(tmp_path)(*inputs) if backbone == "sd3" else
          flux_transformer.load_diffusers(tmp_path)(*inputs, np.array([3.5])))
  np.testing.assert_allclose(np.asarray(ours).transpose(0, 3, 1, 2), expected, atol=5e-5)
  assert diffusers_peer.train_step_seconds(peer, 2, 16, 3, steps=1) > 0
  config = t2i_shapes.get_config("test")
  config.latent.autoencoder_path = str(tmp_path / "vae")
  with pytest.raises(ValueError, match="would also run its autoencoder on the pixels.* give it a latent.cache"):
    bench.peer_table(config, steps=1)


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_peer_benchmark_runs_diffusers_at_a_matched_size(tmp_path_factory, backbone):
  config = tiny_dit_config(tmp_path_factory) if backbone == "dit" else tiny_config(tmp_path_factory)
  config.train.batch_size = 8
  if backbone == "dit":  # ours computes in bfloat16, the peer under bfloat16 autocast
    config.model.dtype = "bfloat16"
  lines = bench.peer_table(config, steps=1, sampler_steps=2, sample_batch=2).splitlines()
  peer = {"unet": "UNet2DConditionModel, layers_per_block=", "dit": "PixArtTransformer2DModel, num_layers="}
  assert lines[0].startswith(f"peer: diffusers {peer[backbone]}")
  assert lines[0].endswith(f"on cpu ({config.model.dtype})") and "on the CPU with" in lines[0]
  rows = {cells(r)[0]: cells(r)[1:] for r in lines[4:]}
  assert len(rows) == 3
  params = rows[f"{bench.BACKBONE_NAMES[backbone]} parameters"]
  assert 0.7 < float(params[0].rstrip("M")) / float(params[1].rstrip("M")) < 1.3
  for name, values in rows.items():
    assert float(values[0].rstrip("M")) > 0 and float(values[1].rstrip("M")) > 0, name


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_ops_benchmark_compares_the_same_functions(tmp_path_factory, backbone):
  import torch

  from diffusion_jax import op_bench

  config = tiny_config(tmp_path_factory)
  config.train.batch_size = 2
  if backbone == "dit":
    config.model.update(backbone="dit", channels=16, depth=2, patch_size=2)
  compared = []
  for name, ours, ours_args, theirs, theirs_args, to_ours_layout in op_bench.cases(config):
    with torch.no_grad():
      expected = to_ours_layout(theirs(*theirs_args)).numpy()
    np.testing.assert_allclose(ours(*ours_args), expected, rtol=1e-4, atol=1e-4, err_msg=name)
    compared.append(name.split(" ")[0])
  if backbone == "unet":
    levels, attention_levels = len(config.model.channel_mults), len(config.model.attention_levels)
    assert compared.count("3x3") == levels and compared.count("group") == 2 * levels
    assert compared.count("self-attention") == compared.count("cross-attention") == 2 * attention_levels
  else:
    assert compared == ["linear", "layer", "GEGLU"] + ["self-attention"] * 2 + ["cross-attention"] * 2
  lines = op_bench.table(config, repeats=1).splitlines()
  assert len(lines) == 4 + len(compared) and all(float(cells(r)[-1]) > 0 for r in lines[4:])


def test_a_flag_the_mode_does_not_read_is_refused():
  result = subprocess.run([sys.executable, "-m", "diffusion_jax.bench", "memory", "--steps=3"],
                          cwd=pathlib.Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
  expected = "error: --steps: not used by the memory mode (only by input, step, peer, ops, lora, profile, compile)"
  assert result.stderr.splitlines()[-2:] == [expected, "(--help lists every flag)"]


def test_lora_benchmark_trains_fewer_weights_and_keeps_less_state(tmp_path_factory):
  # A DiT (no convolutions to adapt, so no such row) compiles in a third of the U-Net's time.
  rows = [cells(r) for r in bench.lora_table(tiny_dit_config(tmp_path_factory), steps=1, rank=2).splitlines()[2:]]
  assert [r[0] for r in rows] == ["full fine-tune", "LoRA rank 2, attention", "LoRA rank 2, attention + feed-forward",
                                  "LoRA rank 2, attention + modulation"]
  parameters, state, frozen = ([float(r[i].replace(",", "")) for r in rows] for i in (1, 2, 3))
  assert parameters[1] < parameters[2] < parameters[0] / 3 and state[1] < state[2] < state[0] / 3
  assert parameters[1] < parameters[3] < parameters[0] / 3
  # The LoRAs' frozen weights are the model's: a quarter of a full fine-tune's state (weights, one EMA copy, two
  # Adam moments).
  assert frozen[0] == 0 and frozen[1] == frozen[2] == frozen[3] == pytest.approx(state[0] / 4, rel=0.05)
  assert all(float(r[4]) > 0 and float(r[5]) > 0 for r in rows)


def test_compile_benchmark_table(tmp_path_factory):
  config = tiny_dit_config(tmp_path_factory)
  config.model.depth = 1  # it compiles three programs twice, none from a cache
  config.sample.batch_size = 8
  lines = bench.compile_table(config, steps=1, repeats=1).splitlines()
  assert lines[0].endswith("compile per program and level (fastest-slowest)")
  rows = {cells(r)[0]: cells(r)[1:] for r in lines[4:]}
  assert list(rows) == ["initialisation", "train step", "sampling (4-step dpmpp_2m, 8 samples)"]
  for hlo_lines, compile_cheap, compile_full, run_cheap, run_full, pays_off in rows.values():
    assert int(hlo_lines.replace(",", "")) > 100
    assert all(float(x) > 0 for x in (compile_cheap, compile_full, run_cheap, run_full))
    runs, unit = pays_off.replace(",", "").split(" ", 1)
    assert pays_off == "never (not faster)" or unit == ("runs" if int(runs) > 1 else "run") and int(runs) >= 1
  assert jax.config.jax_enable_compilation_cache  # the benchmark turned the persistent cache back on


def test_compile_benchmark_compiles_anew_each_time(tmp_path_factory):
  from diffusion_jax import sharding, train
  from diffusion_jax.models import text_to_image

  config = tiny_dit_config(tmp_path_factory)
  mesh = sharding.make_mesh(config.mesh)
  _, params, frozen = text_to_image.split(text_to_image.abstract(config), config)
  init = train.weights_init(config, (sharding.state_shardings(params, mesh), sharding.state_shardings(frozen, mesh)))
  seconds, _ = bench.compile_seconds(init.lower(jax.random.key(0)), level=0, repeats=2)
  # Neither JAX's in-memory cache nor the persistent cache the tests share may answer the second compile: either
  # would make it several times faster than the first (1 s or more, so the persistent cache would keep it).
  assert max(seconds) < 3 * min(seconds), f"compiles took {seconds} s: the second read from a cache?"


def test_restore_benchmark_reads_the_sampling_weights_apart_from_the_state(trained):
  """Each way of reading runs in a fresh process: the sampling weights (one EMA copy and the frozen weights) are
  what load_checkpoint restores, a fraction of the whole state; the table's bytes are those of the checkpoint."""
  from diffusion_jax import sample

  config, workdir, _ = trained
  rows = {cells(r)[0]: cells(r)[1:] for r in bench.restore_table(str(workdir), repeats=1).splitlines()[2:]}
  weights, state = rows["sampling weights (load_checkpoint)"], rows["whole train state (resuming)"]
  _, loaded, *_ = sample.load_checkpoint(workdir)
  assert float(weights[0]) == pytest.approx(sum(x.nbytes for x in jax.tree.leaves(tuple(loaded))) / 1e6, abs=0.01)
  copies = 2 + len(config.train.ema_decays)  # trained weights, Adam's two moments and the EMA copies
  assert float(state[0]) > float(weights[0]) * copies / 2
  assert all(float(value) > 0 for value in weights[1:] + state[1:])
  with pytest.raises(ValueError, match="has no checkpoint to read; train first"):
    bench.restore_table(str(workdir / "nothing_here"), repeats=1)


ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_gpu_wheels_carry_what_the_lent_machine_lacks_at_the_versions_tested_here():
  """launch/gpu_wheels.py: the data stack and diffusers travel (the lent machine lacks them), optax and orbax at our
  versions; jax, flax (which must match jax), torch and what the machine has stay behind, as does PyAV (no
  benchmark writes MP4s)."""
  result = subprocess.run([sys.executable, str(ROOT / "launch" / "gpu_wheels.py"), "--dry_run"], capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  carried = dict(line.split("==") for line in result.stdout.split())
  assert {"tensorflow-datasets", "grain", "array-record", "ml-collections", "diffusers", "optax", "orbax-checkpoint",
          "promise", "tensorboardx"} <= carried.keys()
  assert not {"jax", "jaxlib", "flax", "torch", "numpy", "absl-py", "pillow", "av", "diffusion-jax"} & carried.keys()
  for name, version in carried.items():
    assert importlib.metadata.version(name) == version, name


def test_gpu_bench_script_writes_what_it_ran_and_refuses_unknown_names(tmp_path):
  """launch/gpu_bench.sh, rehearsed on the CPU with this interpreter: `env` writes the versions and devices to
  $OUT/gpu_bench.md; an unknown benchmark name exits 2 naming the known ones."""
  env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "WHEELS": str(tmp_path / "none")}
  result = subprocess.run(["bash", str(ROOT / "launch" / "gpu_bench.sh"), "env"], env=env, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  written = (tmp_path / "out" / "gpu_bench.md").read_text()
  assert f"- jax {jax.__version__}\n" in written and "- jax devices: [CpuDevice(id=0)" in written
  assert f"- grain {importlib.metadata.version('grain')}\n" in written
  result = subprocess.run(["bash", str(ROOT / "launch" / "gpu_bench.sh"), "stepp"], env=env, capture_output=True,
                          text=True, timeout=60)
  assert result.returncode == 2 and "no benchmark named 'stepp' (env, step, attention, base64, remat, peer_dit" in \
      result.stderr
