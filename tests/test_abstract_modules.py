"""Abstract modules: traced once per key, a module of its own for each caller."""

import jax
import numpy as np
from flax import nnx

from diffusion_jax.models import abstract_modules


def test_a_key_is_traced_once_and_each_caller_fills_a_module_of_its_own(monkeypatch):
  traced = []

  def make():
    traced.append(1)
    return nnx.Linear(2, 3, rngs=nnx.Rngs(0))

  first, second = (abstract_modules.cached(make, "a linear layer") for _ in range(2))
  assert len(traced) == 1 and first is not second
  assert isinstance(first.kernel.get_value(), jax.ShapeDtypeStruct) and first.kernel.shape == (2, 3)
  first.kernel.set_value(np.ones((2, 3), np.float32))  # as a checkpoint's weights are read into it
  assert isinstance(second.kernel.get_value(), jax.ShapeDtypeStruct)
  assert isinstance(abstract_modules.cached(make, "a linear layer").kernel.get_value(), jax.ShapeDtypeStruct)
  # `of` keys by the class and its arguments; the oldest keys are let go
  assert abstract_modules.of(nnx.Linear, 2, 4).kernel.shape == (2, 4)
  assert abstract_modules.of(nnx.Linear, 2, 5).kernel.shape == (2, 5)
  monkeypatch.setattr(abstract_modules, "KEPT", 2)
  abstract_modules.of(nnx.Linear, 2, 6)
  abstract_modules.cached(make, "a linear layer")
  assert len(traced) == 2
