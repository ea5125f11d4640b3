"""Training end to end on a simulated 8-device CPU pod: run, resume exactly, FSDP, non-finite skipping,
config validation."""

import errno
import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest

from conftest import assert_trees_equal, resumed_after_preemption, tiny_config
from configs import t2i_shapes
from diffusion_jax import checkpoint, config_checks, sharding, train
from diffusion_jax.data import pipeline
from diffusion_jax.text import tokenizers


def test_training_writes_checkpoints_and_metrics(trained):
  config, workdir, _ = trained
  assert checkpoint.manager(workdir, read_only=True).all_steps() == [2, 4]
  lines = [json.loads(line) for line in (workdir / "logs" / "train.jsonl").read_text().splitlines()]
  assert [line["step"] for line in lines] == [2, 4]
  for line in lines:
    assert np.isfinite(line["loss"]) and line["loss"] > 0
    assert line["tflops_per_device"] > 0 and 0 < line["mfu"]
    assert any(k.startswith("loss_by_logsnr/") for k in line)
  assert checkpoint.read_config(workdir).train.steps == config.train.steps
  # Samples during training (train.sample_every=2): step 2 only; the last step's are main's (sample_at_end).
  assert sorted(p.name for p in (workdir / "samples").iterdir()) == ["step_2"]
  assert (workdir / "samples" / "step_2" / "grid.png").exists() and any((workdir / "logs" / "samples").iterdir())


def test_resume_reproduces_the_uninterrupted_run(trained, tmp_path):
  # The uninterrupted run sampled at step 2, this one (resumed after it) does not: sampling leaves training alone.
  config, workdir, final = trained
  assert_trees_equal(resumed_after_preemption(config, workdir, tmp_path, 4).params, final)


def one_step(config, mesh_config, batch_np, devices=None):
  config = config.copy_and_resolve_references()
  config.mesh.update(mesh_config)
  mesh = sharding.make_mesh(config.mesh, devices)
  state, graphdef = train.init_state(config, mesh)
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch_np.items()}
  compiled, _ = train.compile_step(config, train.make_train_step(config, graphdef), state, shapes, mesh)
  return compiled(state, pipeline.to_global(batch_np, sharding.batch_sharding(mesh)), train.place_hparams(config, mesh))


@pytest.fixture(scope="session")
def batch(tmp_path_factory):
  config = tiny_config(tmp_path_factory)
  source = pipeline.data_source(config.data, "train")
  loader = pipeline.make_loader(config.data, source, tokenizers.from_config(config), config.train.batch_size, seed=0)
  local = next(iter(loader))
  return config, {k: local[k] for k in ("image", "text_ids", "text_mask")}


def test_data_parallel_fsdp_and_tensor_parallel_match_one_device(batch):
  config, batch_np = batch
  single_state, single_metrics = one_step(config, dict(data=1, fsdp=1, tensor=1), batch_np, jax.devices()[:1])
  dp_state, dp_metrics = one_step(config, dict(data=-1, fsdp=1, tensor=1), batch_np)
  fsdp_state, fsdp_metrics = one_step(config, dict(data=2, fsdp=2, tensor=2), batch_np)
  for metrics, state in ((dp_metrics, dp_state), (fsdp_metrics, fsdp_state)):
    np.testing.assert_allclose(metrics["loss"], single_metrics["loss"], rtol=1e-4)
    ours, single = jax.device_get((state.params, single_state.params))
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(single)):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
  # FSDP really shards: per-device parameter + optimizer bytes well under the replicated total.
  def per_device_bytes(tree):
    return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree))
  total = sum(leaf.nbytes for leaf in jax.tree.leaves(fsdp_state.params))
  assert per_device_bytes(fsdp_state.params) < 0.6 * total
  assert per_device_bytes(fsdp_state.opt_state) < 0.6 * 2 * total


def test_nonfinite_batch_skips_the_update(batch):
  config, batch_np = batch
  bad = dict(batch_np, image=np.full_like(batch_np["image"], np.nan))
  config = config.copy_and_resolve_references()
  mesh = sharding.make_mesh(config.mesh)
  state, graphdef = train.init_state(config, mesh)
  before = jax.device_get(state.params)
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in bad.items()}
  compiled, _ = train.compile_step(config, train.make_train_step(config, graphdef), state, shapes, mesh)
  bad = pipeline.to_global(bad, sharding.batch_sharding(mesh))
  state, metrics = compiled(state, bad, train.place_hparams(config, mesh))
  assert int(metrics["nonfinite"]) == 1 and int(state.nonfinite_run) == 1 and int(state.step) == 1
  for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(before)):
    np.testing.assert_array_equal(a, b)


def test_a_diverging_run_stops_with_its_last_state_saved(trained, tmp_path):
  """train.max_nonfinite steps in a row with a non-finite loss or gradient stop the run: its state is saved, and
  the error says what to change (the learning rate, where an update made the weights diverge)."""
  config = trained[0].copy_and_resolve_references()
  config.optimizer.update(learning_rate=1e30, warmup_steps=0)  # step 2's update diverges (step 1's rate is 0)
  config.train.update(steps=6, max_nonfinite=2, log_every=1, sample_every=0, sample_at_end=False)
  with pytest.raises(FloatingPointError, match=r"2 steps in a row had a non-finite loss or gradient \(step 4\); "
                     r"the last good state is saved in .*Lower optimizer.learning_rate"):
    train.train_and_evaluate(config, tmp_path / "work")
  assert checkpoint.manager(tmp_path / "work", read_only=True).all_steps()[-1] == 4


def test_grad_accumulation_matches_one_big_batch(batch):
  config, batch_np = batch
  config = config.copy_and_resolve_references()
  one_device = jax.devices()[:1]  # accumulation does not depend on the mesh; one device compiles faster
  _, big = one_step(config, dict(data=1), batch_np, one_device)
  config.train.grad_accum = 2
  _, accumulated = one_step(config, dict(data=1), batch_np, one_device)
  # Different noise per micro-batch, so compare the scale, not the value.
  assert 0.5 < float(accumulated["grad_norm"]) / float(big["grad_norm"]) < 2.0


def test_runs_differing_only_in_optimizer_numbers_share_the_compiled_step(tmp_path_factory):
  # A learning-rate sweep, the budgets of one size in a scaling sweep, a resume with more steps: one program.
  config = tiny_config(tmp_path_factory)
  other = config.copy_and_resolve_references()
  other.train.steps = config.train.steps * 3
  other.optimizer.update(learning_rate=1e-3, warmup_steps=7, end_learning_rate_factor=0.5, b1=0.8, b2=0.95,
                         weight_decay=0.01, grad_clip=0.5)
  mesh = sharding.make_mesh(config.mesh)
  program = lambda c: train.lower_abstract_step(c, mesh)[0].as_text()
  assert program(config) == program(other)


def test_config_validation_reports_all_problems():
  config = t2i_shapes.get_config("test")
  config.mesh.update(data=3, fsdp=1, tensor=1)
  config.diffusion.prediction = "score"
  config.sample.steps = 0
  config.text.t5.position_bias_init = "alibi"
  config.data.wrap_around = True  # captioned_shapes has no paths
  config.data.resolution = 24  # (captioned_shapes draws 16, 32 or 64 px)
  config.text.tokenizer = "sentencepiece"  # without its model (text.spiece_path)
  config.model.update(heads=3, dropout=1.5, ff_mult=0)  # (sizes the network could not be built with)
  config.text.update(max_length=0)
  config.text.t5.d_kv = 0
  config.sample.update(num_per_prompt=0, eta=2.0, guidance_rescale=-0.5, video_length=16,
                       kontext_resize="own", guidance_scale=float("nan"))
  config.data.update(max_objects=3, num_eval=0)
  config.optimizer.update(learning_rate=float("nan"), b2=1.0, warmup_steps=-1, end_learning_rate_factor=2.0)
  with pytest.raises(ValueError) as error:
    config_checks.validate(config, device_count=8)
  message = str(error.value)
  assert "optimizer.learning_rate=nan must be > 0" in message and "optimizer.b2=1.0 must be in [0, 1)" in message
  assert "optimizer.warmup_steps=-1 must be >= 0" in message and "end_learning_rate_factor=2.0" in message
  assert "has 3 devices but 8 are present" in message
  assert "diffusion.prediction='score'" in message and "sample.steps=0" in message
  assert "text.t5.position_bias_init='alibi'" in message
  assert "data.wrap_around makes moving_shapes' frames a torus; data.dataset='captioned_shapes'" in message
  assert "data.resolution=24: captioned_shapes draws images of 16, 32 or 64 px" in message
  assert "text.tokenizer='sentencepiece' needs text.spiece_path" in message
  assert "model.heads=3 must divide every attention width" in message and "not [32]" in message
  for part in ("model.dropout=1.5 must be in [0, 1)", "model.ff_mult=0 must be >= 1", "text.max_length=0 must be >= 1",
               "text.t5.d_kv=0 must be >= 1", "sample.num_per_prompt=0 must be >= 1",
               "data.max_objects=3 must be in 1..2", "data.num_eval=0 must be >= 1", "sample.eta=2.0 must be in [0, 1]",
               "sample.guidance_rescale=-0.5 must be in [0, 1]",
               "sample.video_length=16: a video model's settings, which an image model (model.temporal=False) does not "
               "read", "sample.kontext_resize='own': the size of FLUX.1 Kontext's reference images",
               "sample.guidance_scale=nan must be >= 0"):
    assert part in message
  config = t2i_shapes.get_config("test")
  config.model.attention = "flash"
  with pytest.raises(ValueError, match="model.attention='flash' is not one of"):
    config_checks.validate(config, device_count=8)
  config.model.attention = "cudnn"
  with pytest.raises(ValueError, match="needs an NVIDIA GPU .this backend is cpu."):
    config_checks.validate(config, device_count=8)
  config = t2i_shapes.get_config("test")
  config.train.batch_size = 12
  with pytest.raises(ValueError, match="not divisible by the data-parallel size 8"):
    config_checks.validate(config, device_count=8)
  config.model.update(backbone="dit", heads=0)  # (the DiT's width check divides by it)
  assert "model.heads=0 must be >= 1" in " ".join(config_checks.problems(config, device_count=8))
  config_checks.validate(t2i_shapes.get_config("test"), device_count=8)
  config_checks.validate(t2i_shapes.get_config("fsdp"), device_count=8)
  from configs import t2v_moving_shapes  # clips: a video model's, with frames

  config = t2v_moving_shapes.get_config("test")
  config.data.frames = 0
  assert "data.frames=0 must be >= 1" in " ".join(config_checks.problems(config, device_count=8))
  config.data.frames, config.model.temporal = 4, False
  assert ("data.dataset='moving_shapes' holds clips, which an image model (model.temporal=False) cannot read" in
          " ".join(config_checks.problems(config, device_count=8)))


def test_non_square_training_images_are_checked():
  from configs import sr_shapes

  config = t2i_shapes.get_config("test")
  config.data.width = 24
  found = lambda: " ".join(config_checks.problems(config, device_count=8))
  assert "data.width=24: captioned_shapes draws square images" in found()
  config.data.update(dataset="tfds", name="pets", heldout_combinations=())
  config.text.update(tokenizer="sentencepiece", spiece_path="spiece.model")  # (words: captioned_shapes' alone)
  assert found() == ""
  config.data.width = 21
  assert "data.width=21 must be a multiple of 2 (the U-Net's 2 ** (levels - 1), 2 levels)" in found()
  config.data.width = -4
  assert "data.width=-4 must be >= 0 (0: data.resolution)" in found()
  config.model.backbone = "dit"
  config.data.width, config.model.position_max_period = 64, 16.0
  assert ("data.resolution, data.width: the DiT's patch grid's longer side (32) is past "
          "model.position_max_period=16.0") in found()
  config = sr_shapes.get_config("test")
  config.data.update(dataset="tfds", width=64)
  assert "data.width=64: a super-resolution stage trains on squares (its input is the stage below's); leave it at 0" \
      in found()


def test_data_that_cannot_be_opened_are_refused_before_anything_is_built(tmp_path):
  """A data.dataset the pipeline does not know, the words tokenizer on other data, and (for the jobs that read the
  data: training, evaluation) a folder dataset without its folder or captions file or a TFDS one without its name
  are config errors, before the model is built (the first two were the tokenizer's error after it, the others a
  folder of '.' or TFDS's error). Sampling a pretrained config reads no data: its configs leave them unset."""
  config = t2i_shapes.get_config("test")
  config.data.update(dataset="bogus", heldout_combinations=())
  found = lambda: " ".join(config_checks.problems(config, device_count=8))
  assert ("data.dataset='bogus' is not one of ['captioned_shapes', 'moving_shapes', 'folder', 'folder_clips', "
          "'tfds']") in found()
  config.data.dataset = "folder"
  assert "text.tokenizer='words' knows only the built-in datasets' words" in found()
  config.text.update(tokenizer="sentencepiece", spiece_path="spiece.model")
  config_checks.validate(config, device_count=8)  # (what sampling a pretrained config checks)
  with pytest.raises(ValueError, match=r"data.dataset='folder' reads data.folder \(the local folder of files\): set "
                                       r"it\n  - data.dataset='folder' reads data.captions_file"):
    train.train_and_evaluate(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()
  config.data.update(dataset="tfds", name="")
  assert config_checks.data_source_problems(config.data) == [
      "data.dataset='tfds' opens the prepared TFDS dataset data.name (in data.data_dir): set it"]
  config.data.update(dataset="folder_clips", folder="clips", captions_file="clips/captions.jsonl")
  assert config_checks.data_source_problems(config.data) == []


def test_logical_rules_never_reuse_a_mesh_axis():
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  spec = sharding.logical_to_spec(("embed", "embed"), (8, 8), mesh)
  assert spec == jax.sharding.PartitionSpec("fsdp", None)
  assert sharding.logical_to_spec(("embed", "mlp"), (3, 8), mesh) == jax.sharding.PartitionSpec(None, "tensor")


def test_a_workdir_that_cannot_hold_a_run_is_refused_before_anything_is_built(tmp_path):
  checkpoint.prepare_workdir(tmp_path / "new" / "run")
  assert (tmp_path / "new" / "run").is_dir()
  with pytest.raises(ValueError, match="is a URL.*gcsfuse"):
    checkpoint.prepare_workdir("gs://bucket/run")  # pathlib would have made it a local gs:/bucket/run
  with pytest.raises(ValueError, match="is a URL"):  # sample and evaluate jobs read workdirs the same way
    checkpoint.read_config("gs://bucket/run")
  (tmp_path / "a_file").write_text("")
  with pytest.raises(ValueError, match="cannot be made a directory"):
    checkpoint.prepare_workdir(tmp_path / "a_file")
  with pytest.raises(ValueError, match="cannot be made a directory"):  # checked before the model and data
    train.train_and_evaluate(t2i_shapes.get_config("test"), tmp_path / "a_file" / "run")


def test_a_second_training_job_on_a_busy_workdir_is_refused(tmp_path):
  with checkpoint.workdir_lock(tmp_path):
    with pytest.raises(ValueError, match=f"in use by another training job \\(pid {os.getpid()} on "):
      train.train_and_evaluate(t2i_shapes.get_config("test"), tmp_path)
  with checkpoint.workdir_lock(tmp_path):  # released when the job ends
    pass


def test_a_filesystem_without_locks_trains_unguarded(tmp_path, monkeypatch, caplog):
  def no_locks(*_):
    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

  monkeypatch.setattr(checkpoint.fcntl, "flock", no_locks)  # as on some FUSE mounts
  with checkpoint.workdir_lock(tmp_path):
    pass
  assert "would not be noticed" in caplog.text


def test_saving_small_replicated_arrays_compiles_nothing(tmp_path):
  """Each replicated array is written whole by one replica: no slicing programs are compiled per save."""
  mesh = sharding.make_mesh(t2i_shapes.get_config("test").mesh)  # data parallel over the 8 devices
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = {f"w{i}": jax.device_put(np.full((8, 128 * (i + 1)), i, np.float32), replicated) for i in range(3)}
  compiles = []
  listener = lambda event, seconds, **_: compiles.append(event) if event.endswith("backend_compile_duration") else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    mngr = checkpoint.manager(tmp_path)
    checkpoint.save(mngr, 1, state, force=True)
    mngr.wait_until_finished()
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiles == []
  restored, step = checkpoint.restore(mngr, state)
  assert step == 1 and all(np.array_equal(restored[k], state[k]) for k in state)


def test_checkpoint_metadata_and_training_on_from_a_damaged_checkpoint(trained, tmp_path, caplog):
  config, workdir, _ = trained
  mngr = checkpoint.manager(workdir, read_only=True)
  metadata = mngr.metadata(4).custom_metadata
  assert metadata["config"]["train"]["steps"] == config.train.steps and metadata["package_version"]
  damaged = tmp_path / "damaged"
  shutil.copytree(workdir, damaged)
  for path in (damaged / "checkpoints" / "4" / "state").rglob("*"):
    if path.is_file() and path.stat().st_size > 1000:
      path.write_bytes(b"garbage")
  state, _ = train.init_state(config, sharding.make_mesh(config.mesh))
  restored, step = checkpoint.restore(checkpoint.manager(damaged, read_only=True), state)
  assert step == 2 and int(restored.step) == 2
  with pytest.raises(ValueError, match="cannot be read"):
    checkpoint.restore(checkpoint.manager(damaged, read_only=True), state, step=4)
  # A training job resumes from step 2 and can save step 4 again: the unreadable one is set aside, not deleted.
  # An input position that does not fit (here unreadable; by hand: saved with another batch size or process
  # count, which grain refuses) restarts the data order with a new shuffle instead of failing the run.
  (damaged / "checkpoints" / "2" / "data_iter" / "process_0-of-1.json").write_text("garbage")
  caplog.set_level("WARNING", logger="diffusion_jax")
  state, _ = train.train_and_evaluate(config, damaged)
  assert int(state.step) == 4 and checkpoint.manager(damaged, read_only=True).all_steps() == [2, 4]
  assert (damaged / "unreadable_checkpoints" / "4" / "state").is_dir()
  assert "input position saved at step 2 does not fit this run" in caplog.text


def test_resuming_with_a_config_of_another_model_is_refused_and_keeps_the_workdir(trained, tmp_path):
  config, workdir, _ = trained
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  saved = (copy / "config.json").read_text()
  wider = config.copy_and_resolve_references()
  wider.model.channels = config.model.channels + 8
  with pytest.raises(ValueError) as error:
    train.train_and_evaluate(wider, copy)
  message = str(error.value)
  assert f"model.channels: {config.model.channels} -> {wider.model.channels}" in message
  assert f"params/unet/conv_in/bias: float32[{config.model.channels}] -> float32[{wider.model.channels}]" in message
  assert (copy / "config.json").read_text() == saved  # the record of how the checkpoints were trained
  longer = config.copy_and_resolve_references()
  longer.train.update(steps=config.train.steps * 2, batch_size=config.train.batch_size // 2)  # may change
  train.check_resumable(longer, copy, sharding.make_mesh(config.mesh))
  (copy / "config.json").unlink()  # checkpoints copied without it: nothing to compare, the restore decides
  train.check_resumable(wider, copy, sharding.make_mesh(config.mesh))


def test_a_workdir_written_before_newer_config_fields_still_loads(trained, tmp_path):
  from diffusion_jax import sample

  old = tmp_path / "old"
  shutil.copytree(trained[1], old)
  saved = json.loads((old / "config.json").read_text())
  for field in checkpoint.ADDED_FIELDS:  # as written before these fields existed
    *groups, name = field.split(".")
    group = saved
    for key in groups:
      group = group[key]
    del group[name]
  for group in ("inflate", "superres"):
    assert not saved.pop(group)
  (old / "config.json").write_text(json.dumps(saved))
  config = checkpoint.read_config(old)
  for field, value in checkpoint.ADDED_FIELDS.items():
    assert config[field] == value
  assert config_checks.problems(config) == []
  assert sample.load_checkpoint(old)[3] == 4  # the model builds from it and restores


def test_every_config_field_newer_than_the_first_workdirs_has_its_old_behaviour_value():
  from flax import traverse_util

  from configs import base

  first = set((pathlib.Path(__file__).parent / "first_config_fields.txt").read_text().split())
  fields = {".".join(path) for path in traverse_util.flatten_dict(base.get_config().to_dict())}
  missing = sorted(fields - first - set(checkpoint.ADDED_FIELDS))
  assert not missing, f"Add {missing} to checkpoint.ADDED_FIELDS so that older workdirs still load."


def test_restore_onto_a_one_device_mesh(trained):
  config, workdir, final = trained
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  state, _ = train.init_state(config, mesh)
  restored, step = checkpoint.restore(checkpoint.manager(workdir, read_only=True), state)
  assert step == 4
  leaf = jax.tree.leaves(restored.params)[0]
  assert leaf.sharding.mesh.size == 1
  for a, b in zip(jax.tree.leaves(jax.device_get(restored.params)), jax.tree.leaves(final)):
    np.testing.assert_array_equal(a, b)


def test_abstract_state_describes_the_real_state(tmp_path_factory):
  config = tiny_config(tmp_path_factory)
  config.mesh.update(data=2, fsdp=4, tensor=1)
  mesh = sharding.make_mesh(config.mesh)
  real, _ = train.init_state(config, mesh)
  abstract, _ = train.abstract_state(config, mesh)
  describe = lambda x: (x.shape, x.dtype, x.sharding)
  assert jax.tree.structure(real) == jax.tree.structure(abstract)
  assert jax.tree.leaves(jax.tree.map(describe, real)) == jax.tree.leaves(jax.tree.map(describe, abstract))
  assert any(leaf.sharding.spec != jax.sharding.PartitionSpec() for leaf in jax.tree.leaves(abstract.opt_state))
