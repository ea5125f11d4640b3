"""Abstract modules: what `nnx.eval_shape` makes of a module's constructor (ShapeDtypeStruct parameters, nothing
allocated), traced once per key in a process.

Every pretrained part is read into one (its shapes first, then its weights), and a model's sharded state and a
checkpoint's restore targets start from one. A job, a notebook or a test builds the same few many times, and tracing
a constructor takes about 0.7 s for a tiny SDXL U-Net and 0.3 s for its VAE (cProfile of tests/test_sd_unet.py's
ensemble test, which reads the tiny SDXL base and refiner nine times).
"""

import collections
import json

from flax import nnx

from diffusion_jax.models import init_rngs

KEPT = 32  # the latest keys kept (a key's module is a graph definition and shapes: small)
_splits = collections.OrderedDict()  # key -> nnx.split of its abstract module


def cached(make, key):
  """nnx.eval_shape(make) (make: builds the module, e.g. with init_rngs.seeded(0)) as a new module each call, whose
  variables may be set in place; traced once per `key`, a hashable that fixes the module's structure and shapes
  (the config it is built from, and the state of the files that config names)."""
  if key in _splits:
    _splits.move_to_end(key)
  else:
    _splits[key] = nnx.split(nnx.eval_shape(make))
    while len(_splits) > KEPT:
      _splits.popitem(last=False)
  return nnx.merge(*_splits[key], copy=True)


def of(module_class, *arguments):
  """`module_class(*arguments, rngs=init_rngs.seeded(0))` made abstract by `cached`, keyed by the class and its
  arguments: JSON values (a checkpoint's config.json with its defaults, a width, None) or ConfigDicts."""
  key = (module_class.__module__, module_class.__qualname__,
         json.dumps(arguments, sort_keys=True, default=lambda config: config.to_dict()))
  return cached(lambda: module_class(*arguments, rngs=init_rngs.seeded(0)), key)
