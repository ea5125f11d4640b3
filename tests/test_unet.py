"""U-Net: shapes, padding invariance of text conditioning, remat equivalence, bf16, super-resolution inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base
from diffusion_jax.models import layers, unet


def tiny_config(**overrides):
  config = base.get_config().model
  config.update(channels=16, channel_mults=(1, 2), num_res_blocks=(1, 2), attention_levels=(1,), heads=2,
                text_dim=8, dropout=0.1)
  config.update(overrides)
  return config


def inputs(batch=2, res=8, tokens=5):
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (batch, res, res, 3))
  logsnr = jnp.linspace(-5, 5, batch)
  text = jax.random.normal(keys[1], (batch, tokens, 8))
  mask = jnp.arange(tokens)[None, :] < jnp.array([[3], [5]])[:batch]
  return x, logsnr, text, mask


def perturb(model, scale=0.05):
  """Zero-initialised output layers make a fresh model blind to its inputs; nudge every parameter (noise drawn
  on the host: no program compiled per parameter shape)."""
  graphdef, params = nnx.split(model)
  rng = np.random.default_rng(42)
  nudge = lambda p: jnp.asarray(np.asarray(p) + scale * rng.standard_normal(p.shape).astype(p.dtype))
  return nnx.merge(graphdef, jax.tree.map(nudge, params))


@nnx.jit
def run(model, *args, **kwargs):
  """model(*args, **kwargs) compiled as one program (an eager call compiles each of its operations apart)."""
  return model(*args, **kwargs)


@pytest.mark.parametrize("skips", ["block", "level"])
def test_output_shape_and_dtype(skips):
  model = unet.UNet(tiny_config(skips=skips), rngs=nnx.Rngs(0))
  out = run(model, *inputs())
  assert out.shape == (2, 8, 8, 3) and out.dtype == jnp.float32


def test_padding_tokens_do_not_change_output():
  model = perturb(unet.UNet(tiny_config(), rngs=nnx.Rngs(0)))
  x, logsnr, text, mask = inputs()
  garbage = jnp.where(mask[..., None], text, 100.0 * jax.random.normal(jax.random.key(5), text.shape))
  np.testing.assert_allclose(run(model, x, logsnr, text, mask), run(model, x, logsnr, garbage, mask), rtol=1e-5,
                             atol=1e-5)
  longer = jnp.concatenate([text, jnp.ones((2, 3, 8))], axis=1)
  longer_mask = jnp.concatenate([mask, jnp.zeros((2, 3), bool)], axis=1)
  np.testing.assert_allclose(run(model, x, logsnr, text, mask), run(model, x, logsnr, longer, longer_mask), rtol=1e-5,
                             atol=1e-5)


def test_text_changes_output_and_empty_prompt_is_finite():
  model = perturb(unet.UNet(tiny_config(), rngs=nnx.Rngs(0)))
  x, logsnr, text, mask = inputs()
  assert float(jnp.abs(run(model, x, logsnr, text, mask) - run(model, x, logsnr, -text, mask)).max()) > 1e-3
  empty = run(model, x, logsnr, jnp.zeros_like(text), jnp.zeros_like(mask))
  assert bool(jnp.all(jnp.isfinite(empty)))


def test_remat_gives_same_values_and_gradients():
  """Under either remat policy (recompute all of each block, or all but its convolutions and projections)."""
  x, logsnr, text, mask = inputs()
  plain = perturb(unet.UNet(tiny_config(dropout=0.0), rngs=nnx.Rngs(0)))

  def grads(model):
    graphdef, params = nnx.split(model)
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(x, logsnr, text, mask) ** 2)
    return jax.tree.leaves(jax.jit(jax.grad(loss))(params))

  expected = grads(plain)
  for policy in layers.REMAT_POLICIES:
    remat = perturb(unet.UNet(tiny_config(dropout=0.0, remat=True, remat_policy=policy), rngs=nnx.Rngs(0)))
    for a, b in zip(expected, grads(remat)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params():
  model = perturb(unet.UNet(tiny_config(dtype="bfloat16"), rngs=nnx.Rngs(0)))
  reference = perturb(unet.UNet(tiny_config(), rngs=nnx.Rngs(0)))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  out, expected = run(model, *inputs()), run(reference, *inputs())
  assert out.dtype == jnp.float32
  assert float(jnp.abs(out - expected).max()) < 0.05 * float(jnp.abs(expected).max()) + 0.05


def test_dropout_only_with_a_key():
  model = perturb(unet.UNet(tiny_config(dropout=0.5), rngs=nnx.Rngs(0)))
  args = inputs()
  np.testing.assert_array_equal(run(model, *args), run(model, *args))
  assert float(jnp.abs(run(model, *args, dropout_key=jax.random.key(1)) - run(model, *args)).max()) > 1e-4


def test_super_resolution_inputs():
  model = perturb(unet.UNet(tiny_config(lowres_conditioning=True), rngs=nnx.Rngs(0)))
  x, logsnr, text, mask = inputs()
  lowres = jax.random.normal(jax.random.key(3), (2, 4, 4, 3))
  out = run(model, x, logsnr, text, mask, lowres=lowres, aug_logsnr=jnp.zeros(2))
  assert out.shape == x.shape
  assert float(jnp.abs(out - run(model, x, logsnr, text, mask, lowres=-lowres, aug_logsnr=jnp.zeros(2))).max()) > 1e-4
  with pytest.raises(ValueError, match="lowres"):
    run(model, x, logsnr, text, mask)


def test_bad_config_is_explained():
  with pytest.raises(ValueError, match="one entry per level"):
    unet.UNet(tiny_config(num_res_blocks=(1,)), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="divisible by heads"):
    unet.UNet(tiny_config(heads=3), rngs=nnx.Rngs(0))


def test_every_parameter_has_logical_axis_names():
  params = nnx.state(unet.UNet(tiny_config(), rngs=nnx.Rngs(0)), nnx.Param)
  for path, variable in nnx.to_flat_state(params):
    names = variable.get_metadata().get("out_sharding")
    assert names is not None and len(names) == variable.get_value().ndim, path


def test_gradient_reaches_every_parameter_and_output_is_deterministic():
  model = perturb(unet.UNet(tiny_config(dropout=0.0), rngs=nnx.Rngs(0)))
  x, logsnr, text, mask = inputs()
  graphdef, params = nnx.split(model)
  loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(x, logsnr, text, mask) ** 2)
  grads = jax.jit(jax.grad(loss))(params)
  for path, g in nnx.to_flat_state(grads):
    assert float(jnp.abs(g.get_value()).max()) > 0, path
  np.testing.assert_array_equal(run(model, x, logsnr, text, mask), run(model, x, logsnr, text, mask))


def test_coordinate_channels_tell_interior_positions_apart():
  """Convolutions are translation-equivariant: away from the borders a constant image gives the same output
  at every pixel, unless the U-Net also reads each pixel's (y, x) coordinates (model.coordinate_channels)."""
  x, logsnr, text, mask = inputs(batch=1)
  flat = jnp.zeros((1, 40, 40, 3))
  differences = []
  for coordinate_channels in (False, True):
    config = tiny_config(channel_mults=(1,), num_res_blocks=(1,), attention_levels=(), dropout=0.0,
                         coordinate_channels=coordinate_channels)
    out = run(perturb(unet.UNet(config, rngs=nnx.Rngs(0))), flat, logsnr, text, mask)
    differences.append(float(jnp.abs(out[0, 18, 18] - out[0, 22, 21]).max()))
  assert differences[0] < 1e-6 < 1e-3 < differences[1]
