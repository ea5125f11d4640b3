"""LoRA: fine-tunes that train only low-rank updates of the attention projections (model.lora_rank), and their
adapters, exported on their own and fused into a model (lora.py)."""

import dataclasses
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx, traverse_util
from PIL import Image
from safetensors.numpy import save_file

from configs.cascades import shapes_16_32
from configs.cascades.stages import stage
from diffusion_jax import cascade, config_checks, lora, sample, sharding, train
from diffusion_jax.text import tokenizers
from conftest import tiny_config

pytestmark = pytest.mark.xdist_group("lora")  # one worker trains the LoRA run every test here reads


def flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree))


@pytest.fixture(scope="session")
def lora_run(trained, tmp_path_factory):
  """A 2-step rank-2 LoRA fine-tune of the `trained` run, its attention, feed-forward and FiLM projections and
  residual convolutions: (config, workdir, its state at the start, at the end)."""
  config = tiny_config(tmp_path_factory)
  config.model.update(lora_rank=2, lora_convolutions=True, lora_feed_forward=True, lora_modulation=True)
  config.finetune.workdir = str(trained[1])
  config.optimizer.update(learning_rate=1e-2, warmup_steps=0)
  config.train.update(steps=2, checkpoint_every=2, sample_every=0, sample_at_end=False)
  start, _ = train.init_state(config, sharding.make_mesh(config.mesh))
  workdir = tmp_path_factory.mktemp("lora")
  end, _ = train.train_and_evaluate(config, workdir)
  return config, workdir, jax.device_get(start), jax.device_get(end)


def test_a_lora_finetune_trains_only_low_rank_updates_that_start_at_nothing(trained, lora_run):
  """model.lora_rank: every attention projection (with model.lora_convolutions every residual block's 3x3
  convolution, with model.lora_feed_forward every feed-forward projection, with model.lora_modulation every FiLM
  projection) gets a low-rank update (b zero: the model is the other run's at the start); those are all the
  optimizer sees, and training moves them and nothing else."""
  config, _, start, end = lora_run
  _, source, _, _, _ = sample.load_checkpoint(trained[1], use_ema=True)
  updates = flat(start.params)
  adapted = [p for p in flat(source.params) if p[0] == "unet" and p[-1] == "kernel"
             and p[-2] in ("q", "k", "v", "out", "conv1", "conv2", "proj_in", "proj_out", "film")]
  assert {p[-2] for p in adapted} == {"q", "k", "v", "out", "conv1", "conv2", "proj_in", "proj_out", "film"}
  assert len(updates) == 2 * len(adapted) and all(p[-2].endswith("_lora") for p in updates)  # a and b of each
  assert {p[:-2] + (p[-2].removesuffix("_lora"),) for p in updates} == {p[:-1] for p in adapted}
  assert any(w.ndim == 4 for w in updates.values())  # a convolution's a: [3, 3, in, rank]
  assert all(np.all(w == 0) for p, w in updates.items() if p[-1] == "lora_b")
  base = flat(start.frozen)
  for path, weight in flat(source.params).items():  # the other run's weights, frozen
    np.testing.assert_array_equal(base[path], weight)
  after = flat(end.params)
  assert all(np.any(after[p] != updates[p]) for p in updates if p[-1] == "lora_b")  # updates no longer nothing
  for path, weight in flat(end.frozen).items():
    np.testing.assert_array_equal(weight, base[path])
  config = config.copy_and_resolve_references()
  config.finetune.workdir = ""
  assert "model.lora_rank adapts a trained model" in "; ".join(config_checks.problems(config))
  config.model.lora_rank = 0
  assert "model.lora_convolutions: the convolutions' updates need" in "; ".join(config_checks.problems(config))
  assert "model.lora_feed_forward: the feed-forward's updates need" in "; ".join(config_checks.problems(config))
  assert "model.lora_modulation: the scale-shift projections' updates need" in "; ".join(config_checks.problems(config))
  config.model.update(lora_rank=2, backbone="dit")
  assert "model.backbone='dit' has none" in "; ".join(config_checks.problems(config))


def test_an_exported_adapter_holds_the_updates_alone(lora_run, tmp_path):
  config, workdir, _, end = lora_run
  metadata = lora.export(workdir, tmp_path / "adapter.safetensors", use_ema=False)
  adapter = lora.read(str(tmp_path / "adapter.safetensors"))
  trained = {lora.name(p): w for p, w in flat(end.params).items()}
  assert adapter.updates.keys() == trained.keys()
  for name, weight in trained.items():
    np.testing.assert_array_equal(adapter.updates[name], weight)
  assert metadata["rank"] == "2" and metadata["step"] == "2"
  assert json.loads(metadata["config"])["model"]["lora_rank"] == 2
  with pytest.raises(ValueError, match="only a LoRA of Wan's, SD3's or Flux's transformer or SD's U-Net has a"):
    lora.export(workdir, tmp_path / "theirs.safetensors", layout="diffusers")
  with pytest.raises(ValueError, match="only a LoRA of Stable Diffusion's U-Net or Flux's transformer has a kohya "
                                       "layout"):
    lora.export(workdir, tmp_path / "theirs.safetensors", layout="kohya")
  with pytest.raises(ValueError, match="--format=bfl: Black Forest Labs' names are Flux's"):
    lora.export(workdir, tmp_path / "theirs.safetensors", layout="bfl")
  lora.export(workdir, tmp_path / "ema.safetensors")
  ema = lora.read(str(tmp_path / "ema.safetensors"))
  with pytest.raises(ValueError, match="ema.safetensors exists: give a new path .nothing is overwritten."):
    lora.export(workdir, tmp_path / "ema.safetensors", use_ema=False, step=999)  # (before a step is looked for)
  for name, weight in {lora.name(p): w for p, w in flat(end.ema[0]).items()}.items():
    np.testing.assert_array_equal(ema.updates[name], weight)  # the default: the run's sample.use_ema
  # --inspect: per kind of layer, the updates and weights, adding up to the file's.
  result = subprocess.run([sys.executable, "-m", "diffusion_jax.lora", f"--inspect={tmp_path / 'ema.safetensors'}"],
                          cwd=pathlib.Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  first, made, model, *kinds = result.stdout.splitlines()
  rows = {line.split(":")[0].strip(): line.split(":")[1].split(",", 1) for line in kinds}
  assert rows.keys() == {"self-attention", "cross-attention", "feed-forward", "convolution", "modulation"}
  assert sum(int(layers.split()[0]) for layers, _ in rows.values()) == len(ema.updates) // 2
  weights = sum(w.size for w in ema.updates.values())
  assert sum(int(w.split()[0].replace(",", "")) for _, w in rows.values()) == weights
  assert first.endswith(f"rank 2 LoRA updates of {len(ema.updates) // 2} layers, {weights:,} weights")
  assert f"step 2 (EMA), a LoRA of {config.finetune.workdir}" in made and "unet, channels" in model


def test_fused_into_the_source_an_adapter_computes_what_the_lora_model_computes(trained, lora_run):
  """Updates far from nothing (random): the source's model with them fused at scale 1 is the LoRA model (up to
  float rounding); at scale 0 it is the source, bit for bit, and two halves add up to the whole."""
  config, workdir, start, _ = lora_run
  rng = np.random.default_rng(0)
  updates = {p: rng.normal(0, 0.3, w.shape).astype(np.float32) for p, w in flat(start.params).items()}
  adapter = lora.Adapter("random", {lora.name(p): w for p, w in updates.items()}, {})
  _, source, graphdef, _, _ = sample.load_checkpoint(trained[1], use_ema=True)
  lora_graphdef = sample.load_checkpoint(workdir)[2]
  x = rng.normal(size=(2, config.data.resolution, config.data.resolution, 3)).astype(np.float32)
  ids, mask = tokenizers.from_config(config)(["a large red circle at the top left", "a small blue square"])

  def denoised(graphdef, params, frozen):  # one compiled program per model, not each operation compiled apart
    def apply(params, frozen):
      model = nnx.merge(graphdef, params, frozen)
      return model(x, np.array([-2.0, 3.0], np.float32), model.encode(ids, mask), mask)
    return np.asarray(jax.jit(apply)(params, frozen))

  with_updates = denoised(lora_graphdef, traverse_util.unflatten_dict(updates), start.frozen)
  fused = lora.fused(source, [adapter])
  np.testing.assert_allclose(denoised(graphdef, *fused), with_updates, atol=1e-4)
  assert np.abs(denoised(graphdef, *source) - with_updates).max() > 1e-2  # not the source

  kernels = lambda weights: {p: w for p, w in flat(weights.params).items() if p[-1] == "kernel"}
  at = lambda scale: dataclasses.replace(adapter, scale=scale)
  for path, weight in kernels(lora.fused(source, [at(0.0)])).items():
    np.testing.assert_array_equal(weight, kernels(source)[path])
  whole, halves = kernels(fused), kernels(lora.fused(source, [at(0.5), at(0.5)]))
  assert sum(np.any(whole[p] != kernels(source)[p]) for p in whole) == len(updates) // 2  # each adapted kernel
  for path in whole:
    np.testing.assert_allclose(halves[path], whole[path], atol=1e-6)


def test_sampling_with_an_adapter_file_records_it(trained, lora_run, tmp_path):
  _, workdir, _, _ = lora_run
  lora.export(workdir, tmp_path / "adapter.safetensors")
  overrides = {"num_per_prompt": 1, "steps": 3}
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a large red circle at the top left\na small blue square at the bottom right\n")
  images = lambda out: np.stack([np.asarray(Image.open(p)) for p in sorted(out.glob("p*.png"))])
  source = images(sample.run(trained[1], overrides, prompts, output_dir=tmp_path / "s").parent)
  adapted = sample.run(trained[1], overrides, prompts, output_dir=tmp_path / "a",
                       adapters=[lora.read(f"{tmp_path / 'adapter.safetensors'}:100")]).parent
  assert np.abs(images(adapted).astype(int) - source).max() > 8  # two steps' updates, a hundred times over
  record = json.loads((adapted / "manifest.jsonl").read_text().splitlines()[0])
  assert record["lora"] == [{"file": str(tmp_path / "adapter.safetensors"), "scale": 100.0,
                             "workdir": str(workdir.resolve()), "step": 2, "ema": True}]
  # A cascade stage takes the adapter as its `lora` field: the same samples, the adapter in the chain's provenance.
  config = shapes_16_32.get_config()
  config.update(stages=(stage(str(trained[1]), steps=3, lora=f"{tmp_path / 'adapter.safetensors'}:100"),),
                num_per_prompt=1, prompts=tuple(prompts.read_text().splitlines()))
  stages = cascade.load(config)
  [output] = cascade.generate(stages, list(config.prompts))
  np.testing.assert_array_equal(output[:, 0], images(adapted))
  assert cascade.provenance(stages)[0]["lora"] == record["lora"]
  config.stages[0].lora = str(tmp_path / "missing.safetensors")
  with pytest.raises(ValueError, match=r"stage 0 \(--cascade.stages\[0\].lora\): --lora=.*missing.safetensors: "
                                       r"no file"):
    cascade.load(config)
  # An adapter that does not fit its stage's model joins the chain's list of problems, before anything is restored.
  save_file({"unet/nothing_lora/lora_a": np.zeros((4, 2), np.float32),
             "unet/nothing_lora/lora_b": np.zeros((2, 4), np.float32)},
            str(tmp_path / "other.safetensors"), metadata={"format": lora.FORMAT})
  config.stages[0].lora = str(tmp_path / "other.safetensors")
  with pytest.raises(ValueError, match=r"Invalid cascade:\n  - stage 0 \(--cascade.stages\[0\].lora\): --lora=.*"
                                       r"other.safetensors: its updates .* unet/nothing/kernel is not in this model"):
    cascade.load(config)


def test_a_prompts_file_sets_each_prompts_lora_scale(trained, lora_run, tmp_path):
  """'lora_scale' in a .jsonl prompts file: at 0 a prompt samples the source model (bit for bit, as without the
  adapter); a list gives one scale per --lora; the manifest records it; a scale without adapters, or a list of
  another length, is refused before a checkpoint is read."""
  _, workdir, _, _ = lora_run
  lora.export(workdir, tmp_path / "adapter.safetensors")
  adapter = lora.read(f"{tmp_path / 'adapter.safetensors'}:100")
  overrides = {"num_per_prompt": 1, "steps": 3}
  prompt = "a large red circle at the top left"
  lines = [{"prompt": prompt, "seed": 1, "lora_scale": 0}, {"prompt": prompt, "seed": 1},
           {"prompt": prompt, "seed": 1, "lora_scale": [100]}]
  (tmp_path / "scales.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
  (tmp_path / "one.txt").write_text(prompt + "\n")
  images = lambda out: [np.asarray(Image.open(p)) for p in sorted(out.glob("p*.png"))]
  scaled = sample.run(trained[1], overrides, tmp_path / "scales.jsonl", output_dir=tmp_path / "a",
                      adapters=[adapter]).parent
  source = sample.run(trained[1], {**overrides, "seed": 1}, tmp_path / "one.txt",
                      output_dir=tmp_path / "s").parent
  at_zero, default, at_hundred = images(scaled)
  np.testing.assert_array_equal(at_zero, images(source)[0])
  np.testing.assert_array_equal(default, at_hundred)  # --lora's own scale, 100
  assert np.abs(at_hundred.astype(int) - at_zero).max() > 8
  records = [json.loads(line) for line in (scaled / "manifest.jsonl").read_text().splitlines()]
  assert [r.get("lora_scale") for r in records] == [0.0, None, [100.0]]
  for scale, adapters, message in ((1, [], r"bad.jsonl, prompt 1 .*no --lora adapter to scale"),
                                   ([1, 2], [adapter], r"one scale per --lora adapter \(1\)")):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": prompt, "lora_scale": scale}) + "\n")
    with pytest.raises(ValueError, match=message):
      sample.run(trained[1], overrides, tmp_path / "bad.jsonl", output_dir=tmp_path / "b",
                 adapters=adapters)


def test_an_adapter_is_refused_by_a_model_it_does_not_fit(lora_run, tmp_path, tmp_path_factory):
  _, workdir, _, _ = lora_run
  lora.export(workdir, tmp_path / "adapter.safetensors")
  adapter = lora.read(str(tmp_path / "adapter.safetensors"))
  other = tiny_config(tmp_path_factory)
  other.model.channels = 32
  with pytest.raises(ValueError, match=r"--lora=.*adapter.safetensors: its updates \(from .*\) do not fit this "
                                       r"model: unet/down/0/1/0/conv1/kernel has shape \(3, 3, 32, 32\) here, the "
                                       r"update \(3, 3, 16, 16\).* It was made for a model that differs in: "
                                       r"model.channels: 16 -> 32 \(adapter's -> this one's\)\. It fits its source "
                                       r"run, .*, and runs of that model\."):
    lora.check([adapter], other)
  (tmp_path / "weights.safetensors").write_bytes((tmp_path / "adapter.safetensors").read_bytes()
                                                 .replace(b"diffusion_jax.lora", b"something.else...."))
  with pytest.raises(ValueError, match="is not a diffusion_jax LoRA adapter"):
    lora.read(str(tmp_path / "weights.safetensors"))
  with pytest.raises(ValueError, match="no file"):
    lora.read(str(tmp_path / "missing.safetensors:0.5"))
  (tmp_path / "text.safetensors").write_text("not tensors")
  with pytest.raises(ValueError, match="'.*text.safetensors' cannot be read as safetensors .*Error while deserial"):
    lora.read(str(tmp_path / "text.safetensors"))
  (tmp_path / "pointer.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\n")
  with pytest.raises(ValueError, match="--lora=.*pointer.safetensors: '.*' is a Git LFS pointer, not the file itself"):
    lora.read(str(tmp_path / "pointer.safetensors"))
  assert lora.parse("a:b.safetensors:0.5") == ("a:b.safetensors", 0.5)
  assert lora.parse("dir/adapter.safetensors") == ("dir/adapter.safetensors", 1.0)


def test_only_a_lora_run_exports_an_adapter(trained, tmp_path):
  with pytest.raises(ValueError, match=r"is not a LoRA fine-tune \(model.lora_rank is 0\)"):
    lora.export(trained[1], tmp_path / "adapter.safetensors")


def test_evaluation_with_an_adapter_and_chosen_combinations_records_both(lora_run, tmp_path):
  from diffusion_jax import evaluate

  config, workdir, _, _ = lora_run
  lora.export(workdir, tmp_path / "adapter.safetensors")
  adapter = lora.read(f"{tmp_path / 'adapter.safetensors'}:0.5")
  with pytest.raises(ValueError, match=r"'purple circle' is not a colour-shape combination"):
    evaluate.run(workdir, combinations=("purple circle",))
  assert "red circle" not in config.data.heldout_combinations  # a combination the run trained on
  record, = evaluate.run(workdir, num_prompts=4, heldout_examples=4, combination_prompts=4,
                         combinations=("red circle",), adapters=[adapter])
  assert 0 <= record["accuracy_heldout_combinations/all"] <= 1 and record["step"] == 2
  assert record["settings"]["combinations"] == ["red circle"]
  assert record["settings"]["lora"][0]["scale"] == 0.5
  plain = evaluate.evaluation_settings(config.sample, 4, 4, 4, [])
  assert "lora" not in plain and "combinations" not in plain  # earlier lines keep counting as evaluated
