"""Progressive distillation: the student's target and training levels, the config's refusals, and a distillation
run of the test model (its student samples in one unguided step what its teacher samples in two guided ones)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_trees_equal, resumed_after_preemption
from diffusion_jax import checkpoint, config_checks, distillation, samplers, schedules


def gaussian_denoiser(c):
  """The exact x0 estimate of data x0 ~ N(0, c^2): a linear map of x whose DDIM path bends, so two steps differ
  from one."""
  return lambda x, alpha, sigma: (alpha * c**2 / (alpha**2 * c**2 + sigma**2))[:, None] * x


def grid(steps, path):
  logsnr = schedules.continuous_logsnr_grid(schedules.logsnr_schedule("cosine"), steps)
  return schedules.alpha_sigma_from_logsnr(logsnr, path)


@pytest.mark.parametrize("path", ["vp", "flow"])
def test_one_student_step_to_the_target_lands_where_two_teacher_steps_do(path):
  """At every step of a 4-step grid (the last one ending clean), DDIM from x to the target lands where the teacher's
  two DDIM steps over the 8-step grid land; one step to the teacher's own estimate does not."""
  teacher = gaussian_denoiser(0.5)
  alpha, sigma = grid(8, path)
  x = jax.random.normal(jax.random.key(0), (16, 6))
  for start in range(0, 8, 2):
    alpha3, sigma3 = (jnp.repeat(a[start:start + 3, None], 16, axis=1) for a in (alpha, sigma))  # [3, batch]
    two_steps = samplers.sample(teacher, x, alpha[start:start + 3], sigma[start:start + 3], "ddim")
    target = distillation.target(teacher, x, alpha3, sigma3)
    one_step = lambda x0: samplers.ddim_step(x, x0, alpha[start], sigma[start], alpha[start + 2], sigma[start + 2],
                                             0.0, 0.0)
    np.testing.assert_allclose(one_step(target), two_steps, rtol=1e-4, atol=1e-5)
    assert float(jnp.max(jnp.abs(one_step(teacher(x, alpha3[0], sigma3[0])) - two_steps))) > 1e-3


def test_a_teacher_that_ddim_follows_exactly_is_its_own_student():
  """Data at one point x*: the exact denoiser always says x*, DDIM is exact at any step count, and the target is x*."""
  point = jnp.linspace(-1, 1, 6)
  teacher = lambda x, alpha, sigma: jnp.broadcast_to(point, x.shape)
  logsnr = distillation.training_logsnr(jax.random.key(0), 64, schedules.logsnr_schedule("cosine"), 4)
  alpha, sigma = schedules.alpha_sigma_from_logsnr(logsnr, "vp")
  x = alpha[0][:, None] * point + sigma[0][:, None] * jax.random.normal(jax.random.key(1), (64, 6))
  np.testing.assert_allclose(distillation.target(teacher, x, alpha, sigma), jnp.broadcast_to(point, x.shape),
                             atol=1e-4)


def test_training_levels_are_the_student_grid_steps_with_the_teacher_midpoints():
  logsnr_fn = schedules.logsnr_schedule("cosine")
  teacher_grid = np.asarray(schedules.continuous_logsnr_grid(logsnr_fn, 8))  # the last entry is clean (+inf)
  logsnr = np.asarray(distillation.training_logsnr(jax.random.key(0), 512, logsnr_fn, 4))
  starts = {round(float(v), 3) for v in logsnr[0]}
  assert starts == {round(float(v), 3) for v in teacher_grid[0:8:2]}  # every student step is drawn
  for start, middle, end in logsnr.T:
    i = int(np.argmin(np.abs(teacher_grid - start)))
    np.testing.assert_allclose([middle, end], teacher_grid[i + 1:i + 3], rtol=1e-4)


def test_a_distillation_config_names_what_to_set(tmp_path):
  from configs import t2i_shapes

  config = t2i_shapes.get_config("test")
  config.distill.steps = 2
  config.model.lora_rank = 4
  found = "\n".join(config_checks.problems(config, device_count=1, process_count=1))
  for expected in ("distils the run in finetune.workdir (the teacher): set finetune.workdir",
                   "set model.lora_rank=0", "set sample.sampler='ddim' and sample.eta=0", "set sample.steps=2 (now 4)"):
    assert expected in found
  teacher = t2i_shapes.get_config("test")  # samples at guidance 3, as base.py's default
  teacher.diffusion.prediction = "eps"
  checkpoint.write_config(tmp_path, teacher)
  config = t2i_shapes.get_config("test")
  config.finetune.workdir = str(tmp_path)
  config.distill.steps = 2
  config.sample.update(sampler="ddim", steps=2)
  assert distillation.problems(config) == [
      "the student must read the teacher's outputs as its run did: diffusion.prediction: 'eps' -> 'v' (teacher -> "
      "this config)",
      "a student of a teacher guided at 3.0 (distill.guidance_scale=-1.0) learns the guidance: set "
      "sample.guidance_scale=1 (now 3.0)"]
  config.diffusion.prediction = "eps"
  config.distill.guidance_scale = 1.0  # the teacher unguided: the student may still be sampled guided
  assert distillation.problems(config) == [] and distillation.teacher_sampling(config).guidance_scale == 1.0
  config.distill.guidance_scale = -1.0
  config.sample.update(guidance_scale=1.0, threshold="none")  # the student's; the teacher samples as its run did
  assert distillation.problems(config) == []
  sampling = distillation.teacher_sampling(config)
  assert (sampling.guidance_scale, sampling.threshold) == (3.0, "static")
  config.distill.threshold = "none"  # the teacher's steps unthresholded, whatever its run sampled with
  assert distillation.problems(config) == [] and distillation.teacher_sampling(config).threshold == "none"
  config.distill.threshold = "clip"
  assert distillation.problems(config) == [
      "distill.threshold='clip' must be one of none, static, dynamic, or '' for the teacher's sample.threshold"]
  config.distill.threshold = ""
  config.finetune.workdir = str(tmp_path / "absent")
  assert "finetune.workdir=" in distillation.problems(config)[0]


@pytest.fixture(scope="session")
def distilled(trained, tmp_path_factory):
  """The `trained` run distilled into a student of one unguided step from its two steps at guidance 3 (40 steps,
  checkpoints at 20 and 40): (config, workdir, final state). Its tests are the xdist_group "distillation", so one
  worker distils it."""
  from diffusion_jax import train

  teacher_config, teacher_workdir, _ = trained
  config = teacher_config.copy_and_resolve_references()
  config.finetune.workdir = str(teacher_workdir)
  config.distill.steps = 1  # guided as the teacher samples: at 3
  config.sample.update(sampler="ddim", steps=1, guidance_scale=1.0)
  config.train.update(steps=40, checkpoint_every=20, log_every=20, sample_every=0)
  config.optimizer.update(learning_rate=2e-3, warmup_steps=2)
  workdir = tmp_path_factory.mktemp("distilled")
  state, _ = train.train_and_evaluate(config, workdir)
  return config, workdir, state


@pytest.mark.xdist_group("distillation")
def test_the_student_samples_in_one_unguided_step_what_the_teacher_samples_in_two_guided(distilled, caplog):
  """Same prompts and noise: the student's one unguided DDIM step lands much nearer the teacher's two guided steps
  than the teacher's own one guided step does (measured 0.44 of its distance). Sampled off its grid, the student
  warns."""
  from diffusion_jax import sample
  from diffusion_jax.text import tokenizers

  config, _, state = distilled
  teacher_config, teacher, graphdef, _, mesh = sample.load_checkpoint(config.finetune.workdir)
  tokenizer = tokenizers.from_config(teacher_config)
  prompts = ["a large red circle", "a small blue square at the top left", "a large green triangle",
             "a small yellow circle"] * 4

  def generate(model_config, weights, steps, guidance_scale):
    settings = config.sample.copy_and_resolve_references()
    settings.update(steps=steps, guidance_scale=guidance_scale, num_per_prompt=1)
    images = sample.generate(model_config, graphdef, weights.params, weights.frozen, tokenizer, prompts, settings,
                             mesh, seeds=range(len(prompts)))
    return images.astype(np.float32)

  warnings = lambda: [r.getMessage() for r in caplog.records if r.name == sample.log.name]
  with caplog.at_level("WARNING", logger=sample.log.name):
    reference = generate(teacher_config, teacher, 2, 3.0)
    teacher_distance = np.abs(generate(teacher_config, teacher, 1, 3.0) - reference).mean()
    student_distance = np.abs(generate(config, state, 1, 1.0) - reference).mean()
    assert not warnings()  # the teacher is no student; the student on its own grid
    generate(config, state, 2, 3.0)
  assert student_distance < 0.6 * teacher_distance
  off_grid, guided = warnings()
  assert "distilled for 1 deterministic DDIM steps: sampler='ddim', steps=2" in off_grid
  assert ("run samples at guidance 1.0 (a guided teacher's student has learnt its guidance): guidance_scale=3.0"
          in guided)


@pytest.mark.xdist_group("distillation")
def test_a_resumed_distillation_reads_its_teacher_again_and_ends_where_the_uninterrupted_one_does(distilled,
                                                                                                  tmp_path):
  config, workdir, final = distilled
  assert_trees_equal(resumed_after_preemption(config, workdir, tmp_path, 40).params, final.params)
