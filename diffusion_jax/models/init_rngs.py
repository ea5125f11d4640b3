"""Random streams for building a model, eagerly or inside a trace (`jax.jit`, `nnx.eval_shape`).

Every draw from an `nnx.Rngs` advances a counter Variable. Inside a trace the new count is a tracer, and
with a plain-array counter flax (0.12.8) compares that tracer's `.sharding`; jax (0.10.2) answers with an
AttributeError whose message walks the whole trace so far, so building a model costs O(layers x trace
length): `nnx.eval_shape` of imagen_sr256's U-Net with `nnx.Rngs(0)` took 71-143 s on a 2-core CPU. A counter
kept in a mutable array reference is written in place. The keys, and so the parameters, are the same.
"""

from flax import nnx


def seeded(seed) -> nnx.Rngs:
  """`nnx.Rngs(seed)` whose counters are array references (cheap to advance inside a trace). `seed`: an int, or
  a key (`jax.random.key(seed)`, the same streams) that may be traced."""
  with nnx.var_defaults(ref=True):
    return nnx.Rngs(seed)
