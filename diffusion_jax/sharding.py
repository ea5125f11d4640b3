"""Device mesh and the ONE table mapping logical axis names to mesh axes.

Mesh axes: `data` (batch only: pmap-style data parallel), `fsdp` (batch AND parameters/optimizer
state: fully sharded data parallel), `sequence` (a video model's frames, Wan's tokens: sequence parallel, for clips
whose activations one device cannot hold even at a batch of one), `tensor` (attention heads and MLP hidden: tensor
parallel). Changing the parallelism is a config change (`config.mesh`), never a model change.

Parameters are placed by their logical axis names (`logical_to_spec`). Activations follow the batch's sharding
(XLA's propagation) except where a model calls `constrain`: a video model's frames (rows of frames, `frame_rows`)
and Wan's tokens (`tokens`) are split over `sequence` while the program is traced under `jax.set_mesh` (the train
step's, the held-out loss's and the sampler's are); elsewhere `constrain` does nothing.
"""

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "sequence", "tensor")
# What sampling and evaluation jobs restore a checkpoint onto unless --mesh says otherwise: every device a whole copy.
SAMPLING_MESH = {"data": -1, "fsdp": 1, "sequence": 1, "tensor": 1}

# logical name -> mesh axes (tuple) or None (replicated)
RULES = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "text_embed": ("fsdp",),
    "conv_out": ("fsdp",),
    "conv_in": None,
    "heads": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "norm": None,
    "frames": None,
    "frame_rows": ("data", "fsdp", "sequence"),  # a video batch's frames as rows, [batch * frames]
    "tokens": ("sequence",),
}


def mesh_shape(mesh_config, device_count: int) -> tuple[int, ...]:
  """Resolve -1 entries of config.mesh against the device count; raise if they cannot match."""
  sizes = [mesh_config.get(a, 1) for a in MESH_AXES]  # (a workdir's config from before `sequence` lacks it)
  unknown = [i for i, s in enumerate(sizes) if s == -1]
  if len(unknown) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))}: use positive sizes and at most one -1.")
  known = math.prod(s for s in sizes if s != -1)
  if unknown:
    if device_count % known:
      raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} cannot fill {device_count} devices "
                       f"({device_count} is not divisible by {known}).")
    sizes[unknown[0]] = device_count // known
  if math.prod(sizes) != device_count:
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices but "
                     f"{device_count} are present; make the product match or use -1 for one axis.")
  return tuple(sizes)


def mesh_from_flag(text: str) -> dict:
  """A mesh config from a job's --mesh=AXIS=SIZE,... (e.g. "fsdp=4,sequence=2"): the axes it names over
  SAMPLING_MESH's, `data` taking the devices left (1 where another axis is -1); a ValueError saying what is wrong."""
  sizes = {}
  for part in filter(None, text.split(",")):
    axis, _, size = part.partition("=")
    if axis.strip() not in MESH_AXES or not size.strip().lstrip("-").isdigit():
      raise ValueError(f"--mesh={text!r}: give AXIS=SIZE pairs separated by commas, AXIS one of {list(MESH_AXES)}, "
                       "SIZE a number (-1 for one axis: the devices left), e.g. --mesh=fsdp=4,sequence=2")
    sizes[axis.strip()] = int(size)
  if -1 in sizes.values() and "data" not in sizes:
    sizes["data"] = 1
  return SAMPLING_MESH | sizes


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_spec(logical_axes, shape, mesh, fsdp_fallback=True) -> PartitionSpec:
  """Map logical names to a PartitionSpec; a dim whose size the mesh axes do not divide, or whose
  mesh axis is already used by an earlier dim, stays replicated. If the rules leave `fsdp` unused
  (e.g. 480 channels on 256 devices), FSDP falls back to the largest dim it divides, so parameters
  are sharded whenever any dimension allows it (`fsdp_fallback`; not for activations)."""
  used, spec = set(), []
  for name, size in zip(logical_axes, shape):
    axes = RULES.get(name) if name is not None else None
    if name is not None and name not in RULES:
      raise ValueError(f"Logical axis {name!r} has no sharding rule; add it to sharding.RULES.")
    axes = tuple(a for a in (axes or ()) if a not in used and mesh.shape[a] > 1)
    if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
      used.update(axes)
      spec.append(axes if len(axes) > 1 else axes[0])
    else:
      spec.append(None)
  fsdp = mesh.shape["fsdp"]
  if fsdp_fallback and fsdp > 1 and "fsdp" not in used:
    free = [i for i, (s, size) in enumerate(zip(spec, shape)) if s is None and size % fsdp == 0 and size >= fsdp]
    if free:
      spec[max(free, key=lambda i: shape[i])] = "fsdp"
  return PartitionSpec(*spec)


def constrain(x, logical_axes):
  """x with its dims split over the mesh as its logical names say (`logical_to_spec`, no FSDP fallback), when
  traced under `jax.set_mesh` with a `sequence` axis longer than 1; else x unchanged (so programs without sequence
  parallelism are the ones they were)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or dict(mesh.shape).get("sequence", 1) == 1:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, mesh, fsdp_fallback=False))


def state_shardings(state: nnx.State, mesh) -> dict:
  """NamedShardings, as a pure nested dict like `nnx.to_pure_dict(state)`, from each variable's
  `out_sharding` logical names."""
  result = {}
  for path, variable in nnx.to_flat_state(state):
    logical = variable.get_metadata().get("out_sharding") or (None,) * np.ndim(variable.get_value())
    node = result
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = NamedSharding(mesh, logical_to_spec(logical, np.shape(variable.get_value()), mesh))
  return result


def batch_sharding(mesh) -> NamedSharding:
  """Batch dimension over all data-parallel axes (data and fsdp); other dims replicated."""
  return NamedSharding(mesh, PartitionSpec(RULES["batch"]))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
