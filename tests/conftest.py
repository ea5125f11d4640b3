"""Test session set-up: a simulated 8-device pod on the CPU (must precede any jax import)."""

import os
import pathlib
import shutil
import sys
import tempfile
import types

# Tests run a few steps of tiny models, so compiling costs more than running: XLA:CPU compiles with its
# cheapest code generation and its older loop emitters (about a quarter less compile time than the newer fusion
# emitters here: README, Tests). The jobs tests start inherit this.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
                           " --xla_cpu_use_fusion_emitters=false").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The two xdist workers keep both cores busy: OpenBLAS's threads then wait on each other, and numpy's small
# eigendecompositions (every FID and FVD) took a second instead of 10 ms. One thread each (README, Tests).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# One persistent compilation cache for the session: its xdist workers and the jobs tests start inherit it, so
# a program many tests compile (the test config's train step, its sampler) compiles once per session.
CREATED_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  CREATED_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="diffusion_jax_tests_cache_")
# Every program, not only those over JAX's default second: each job a test starts compiles its few hundred small
# programs (the eager ops of initialisation, data and metrics) again otherwise, 1.5 s of a training job's 17 (README,
# Tests).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import compile_report  # noqa: E402
import pytest  # noqa: E402  (after the environment is set)


def pytest_addoption(parser):
  compile_report.add_option(parser)


def pytest_configure(config):
  compile_report.configure(config)


def pytest_unconfigure(config):
  if CREATED_CACHE:  # the process that made the cache removes it
    shutil.rmtree(CREATED_CACHE, ignore_errors=True)


def tiny_config(tmp_path_factory):
  """The seconds-long test variant of the main experiment, with its own dataset directory."""
  from configs import t2i_shapes

  config = t2i_shapes.get_config("test")
  config.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
  return config


def resumed_after_preemption(config, workdir, tmp_path, last_step: int):
  """The final state of `config`'s run resumed in a copy of `workdir` whose checkpoint `last_step` is gone (as if
  preempted after the one before), checked to reach last_step again."""
  from diffusion_jax import train

  copy = tmp_path / "resumed"
  shutil.copytree(workdir, copy)
  shutil.rmtree(copy / "checkpoints" / str(last_step))
  state, _ = train.train_and_evaluate(config, copy)
  assert int(state.step) == last_step
  return state


def assert_trees_equal(a, b):
  """Bit-identical pytrees of arrays (same batches, same keys)."""
  import jax
  import numpy as np

  for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)), strict=True):
    np.testing.assert_array_equal(x, y)


def exported_run_holds_the_fused_pipeline(run, pipeline, folders):
  """A LoRA run exported whole (export.py: its updates merged into the checkpoint it adapted) holds in each of
  `folders` the weights of the part of diffusers' `pipeline` that has the run's adapter fused (fuse_lora; unloaded
  here, the fused weights staying), within 1e-6."""
  import numpy as np

  from diffusion_jax import export
  from diffusion_jax.models import clip, diffusers_directory

  merged = export.export(run, run.parent / f"{run.name}_merged", use_ema=False)
  pipeline.unload_lora_weights()
  for folder in folders:
    written = (clip.tower_tensors(merged / folder, "text_model.") if folder.startswith("text") else
               diffusers_directory.read_tensors(merged / folder))
    expected = {name: x.numpy() for name, x in getattr(pipeline, folder).state_dict().items()
                if not name.endswith("position_ids")}
    if folder.startswith("text") and not any(name.startswith("text_model.") for name in expected):
      expected = {f"text_model.{name}": x for name, x in expected.items()}  # (transformers 5's CLIPTextModel)
    assert written.keys() == expected.keys(), folder
    for name, x in expected.items():
      np.testing.assert_allclose(written[name], x, atol=1e-6, err_msg=f"{folder}: {name}")


def sweep_table(path) -> dict:
  """An evaluation sweep's markdown table (evaluate.write_sweep) as {swept value: {metric: value}}."""
  header, _, *rows = [[cell.strip() for cell in line.strip("|").split("|")]
                      for line in pathlib.Path(path).read_text().splitlines()]
  return {row[0]: dict(zip(header[1:], map(float, row[1:]))) for row in rows}


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
  """A 4-step training run with checkpoints at 2 and 4 and samples at step 2 (train.sample_every): (config,
  workdir, final params). Runs without samples (a resume from step 2, test_main's) must end bit-identical."""
  import jax

  from diffusion_jax import train

  config = tiny_config(tmp_path_factory)
  config.train.sample_every = 2
  workdir = tmp_path_factory.mktemp("workdir")
  state, _ = train.train_and_evaluate(config, workdir)
  return config, workdir, jax.device_get(state.params)


@pytest.fixture(scope="session")
def trained_video(trained, tmp_path_factory):
  """The t2v test config inflated from the `trained` image workdir, temporal layers only, 4 steps with
  joint image-video batches: (config, workdir, final state). The tests that read it are the xdist_group "video",
  so one worker trains it."""
  from configs import t2v_moving_shapes
  from diffusion_jax import train

  config = t2v_moving_shapes.get_config("test")
  config.data.data_dir = str(tmp_path_factory.mktemp("tfds_video"))
  config.inflate.update(image_workdir=str(trained[1]), train_temporal_only=True)
  config.optimizer.learning_rate = 1e-2  # a few steps must visibly train the temporal layers
  workdir = tmp_path_factory.mktemp("workdir_video")
  state, _ = train.train_and_evaluate(config, workdir)
  return config, workdir, state


CLIP_WORDS = ["a", "red", "blue", "circle", "square", "small", "large", "at", "the", "top", "left"]


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
  """A random-weight transformers CLIPModel saved as a Hugging Face directory with a word-level CLIP-style
  tokenizer.json: (directory, the PyTorch model)."""
  import torch
  import transformers
  from tokenizers import Tokenizer, models, pre_tokenizers, processors

  directory = tmp_path_factory.mktemp("clip")
  vocab = {w: i for i, w in enumerate(["<|startoftext|>", "<unk>"] + CLIP_WORDS + ["<|endoftext|>"])}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(
      single="<|startoftext|> $A <|endoftext|>",
      special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", vocab["<|endoftext|>"])])
  tok.save(str(directory / "tokenizer.json"))
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=8, eos_token_id=vocab["<|endoftext|>"]),
      vision_config=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         image_size=32, patch_size=8, hidden_act="gelu"),
      projection_dim=16)
  torch.manual_seed(0)
  model = transformers.CLIPModel(config).eval()
  model.save_pretrained(directory)
  return directory, model


# torchvision's VGG16 configuration "D": widths, "M" for a 2x2 max pool.
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def torch_vgg16_features():
  """A random-weight `torchvision.models.vgg16().features` (torch.nn.Sequential): same layers at the same indices."""
  import torch

  layers, channels = [], 3
  for layer in VGG16_LAYERS:
    if layer == "M":
      layers.append(torch.nn.MaxPool2d(2, 2))
    else:
      layers += [torch.nn.Conv2d(channels, layer, 3, padding=1), torch.nn.ReLU(inplace=True)]
      channels = layer
  return torch.nn.Sequential(*layers)


@pytest.fixture(scope="session")
def lpips_weights(tmp_path_factory):
  """(LPIPS weights directory: a random-weight VGG16 and the lpips package's linear layers, the lpips package's
  LPIPS on the same trunk)."""
  import torch

  torch.manual_seed(0)
  features = torch_vgg16_features()
  directory = tmp_path_factory.mktemp("lpips")
  state = {f"features.{k}": v for k, v in features.state_dict().items()}
  state["classifier.0.weight"] = torch.zeros(4, 4)  # the classifier the metric does not use
  torch.save(state, directory / "vgg16-397923af.pth")
  # The lpips package imports torchvision for its VGG16; the torchvision wheel pip pairs with the CPU torch here
  # cannot load its operators, so the package is given the trunk above instead (its own code does the rest).
  stub = types.ModuleType("torchvision")
  stub.models = types.SimpleNamespace(vgg16=lambda pretrained=False, **_: types.SimpleNamespace(features=features))
  with pytest.MonkeyPatch.context() as patch:
    patch.setitem(sys.modules, "torchvision", stub)
    patch.setitem(sys.modules, "torchvision.models", stub.models)
    reference = pytest.importorskip("lpips", reason="the LPIPS oracle; `make test` installs lpips==0.1.4 --no-deps")
    oracle = reference.LPIPS(net="vgg", pnet_rand=True, verbose=False)
  shutil.copy(pathlib.Path(reference.__file__).parent / "weights" / "v0.1" / "vgg.pth", directory / "vgg.pth")
  return directory, oracle
