"""Running a causal video autoencoder over a clip a chunk of frames at a time, as diffusers runs Wan's and CogVideoX's
(wan_autoencoder.py, cogvideox_autoencoder.py): only one chunk's activations are alive at once (a 480x832 clip of 81
frames at 96 channels is 12 GB a tensor).

`CausalConv`: a convolution over clips [batch, frames, h, w, c] whose windows end at or before each frame; streamed,
it keeps the frames it read last and reads them in front of the next chunk. `streamed(module, x, chunk, first)`: an
encoder or decoder (whose `__call__(x, first)` says whether x starts at the clip's first frame) applied to the
clip's first `first` frames, then in a compiled loop (lax.scan) to each following chunk of `chunk` frames.
"""

import jax
import jax.numpy as jnp
from flax import nnx


class Frames(nnx.Variable):
  """The last frames a causal convolution read from one chunk of a streamed clip (`streamed`)."""


class CausalConv(nnx.Conv):
  """A convolution over clips [batch, frames, h, w, c] whose windows end at or before each frame, reading the `front`
  frames before its input. Before the clip's first frame those are `fill`: "zeros" (Wan's), "first" (copies of the
  first frame: CogVideoX's) or None (none: Wan's time downsampling). Streamed (`streamed` sets it), it keeps the
  `front` frames it read last in `context` and reads them in front of the next chunk."""

  def __init__(self, *args, front=2, fill="zeros", **kwargs):
    super().__init__(*args, **kwargs)
    self.front, self.fill, self.streamed, self.context = front, fill, False, nnx.data(None)

  def __call__(self, x):
    if not self.front:  # a window one frame long reads nothing before it
      return super().__call__(x)
    if self.context is not None:
      x = jnp.concatenate([self.context[...].astype(x.dtype), x], axis=1)
    elif self.fill == "zeros":
      x = jnp.concatenate([jnp.zeros((x.shape[0], self.front) + x.shape[2:], x.dtype), x], axis=1)
    elif self.fill == "first":
      x = jnp.concatenate([jnp.repeat(x[:, :1], self.front, axis=1), x], axis=1)
    if self.streamed:
      self.context = Frames(x[:, -self.front:])
    return super().__call__(x)


def streamed(module, x, chunk: int, first: int = 1):
  """`module(x)` for x [batch, first + chunk k, ...] run as diffusers runs it: `module(x[:, :first])`, then a
  compiled loop over the k chunks of `chunk` frames (`module(frames, first=False)`), each CausalConv carrying the
  frames it read last into the next chunk; the outputs concatenated along frames. Where nothing in the module mixes
  frames but causally this is the whole clip run at once, holding one chunk's activations; where something does
  (CogVideoX's group norms), it is what diffusers computes."""
  if (x.shape[1] - first) % chunk:
    raise ValueError(f"{x.shape[1]} frames are not {first} + a multiple of {chunk}")
  if x.shape[1] == first:  # one chunk, nothing to carry
    return module(x)
  stream = nnx.merge(*nnx.split(module))
  for _, part in nnx.iter_modules(stream):
    if isinstance(part, CausalConv):
      part.streamed = True
  head = stream(x[:, :first])
  graph, contexts, rest = nnx.split(stream, Frames, ...)

  def step(contexts, frames):
    part = nnx.merge(graph, contexts, rest)
    out = part(frames, first=False)
    return nnx.state(part, Frames), out

  b, frames = x.shape[0], x.shape[1] - first
  chunks = jnp.moveaxis(x[:, first:].reshape((b, frames // chunk, chunk) + x.shape[2:]), 1, 0)
  _, later = jax.lax.scan(step, contexts, chunks)  # [k, batch, frames out, ...]
  later = jnp.moveaxis(later, 0, 1).reshape((b, -1) + later.shape[3:])
  return jnp.concatenate([head, later], axis=1)
