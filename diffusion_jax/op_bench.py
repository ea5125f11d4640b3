"""The U-Net's operations one at a time, ours (JAX, jitted) against PyTorch's at the same shapes.

Says where the train-step gap to diffusers (`bench peer`) comes from. For every level of the config's
U-Net (resolution / 2^level, channels * mult, batch train.batch_size): a 3x3 convolution and group norm
+ SiLU (layers.GroupNorm and flax's own); at the attention levels, self-attention over the level's pixels
and cross-attention to text.max_length tokens (each in models/attention.py's "folded" and "xla"
implementations). Each is timed forward and forward + backward (the gradient of the sum of squared
outputs with respect to the inputs and weights). PyTorch runs diffusers' layout (NCHW) and its own
kernels: oneDNN convolutions and the fused `scaled_dot_product_attention`.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax.models import attention, layers


def seconds(run, repeats: int) -> float:
  """Mean seconds of run() (which blocks until its result is ready) after one warm-up call."""
  run()
  start = time.perf_counter()
  for _ in range(repeats):
    run()
  return (time.perf_counter() - start) / repeats


def jax_times(function, args, repeats: int) -> tuple[float, float]:
  """(forward, forward + backward) seconds of jitted `function(*args)`, gradients for every argument."""
  forward = jax.jit(function)
  both = jax.jit(jax.grad(lambda *a: jnp.sum(function(*a) ** 2), argnums=tuple(range(len(args)))))
  return (seconds(lambda: jax.block_until_ready(forward(*args)), repeats),
          seconds(lambda: jax.block_until_ready(both(*args)), repeats))


def torch_times(function, args, repeats: int) -> tuple[float, float]:
  """(forward, forward + backward) seconds of `function(*args)` in PyTorch."""
  import torch

  def forward():
    with torch.no_grad():
      function(*args)

  def both():
    (function(*args) ** 2).sum().backward()

  return seconds(forward, repeats), seconds(both, repeats)


def cases(config):
  """(name, jax function, jax args, torch function, torch args, torch output -> ours' layout) for each
  operation of the config's U-Net; both compute the same function (weights copied from ours)."""
  import torch

  batch, resolution, m = config.train.batch_size, config.data.resolution, config.model
  rng = np.random.default_rng(0)
  normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)
  as_torch = lambda x: torch.tensor(np.ascontiguousarray(x), requires_grad=True)
  channels_last = lambda y: y.permute(0, 2, 3, 1)
  for level, mult in enumerate(m.channel_mults):
    r, ch = resolution // 2 ** level, m.channels * mult
    x = normal(batch, r, r, ch)
    x_nchw = as_torch(x.transpose(0, 3, 1, 2))
    conv = layers.conv(ch, ch, 3, nnx.Rngs(0), jnp.float32)
    torch_conv = torch.nn.Conv2d(ch, ch, 3, padding=1)
    with torch.no_grad():
      torch_conv.weight.copy_(torch.tensor(np.asarray(conv.kernel[...]).transpose(3, 2, 0, 1)))
      torch_conv.bias.copy_(torch.tensor(np.asarray(conv.bias[...])))
    graphdef, params = nnx.split(conv)
    yield (f"3x3 convolution {r}x{r}x{ch}", lambda p, x, g=graphdef: nnx.merge(g, p)(x), (params, jnp.asarray(x)),
           torch_conv, (x_nchw,), channels_last)
    norm = layers.group_norm(ch, nnx.Rngs(0), jnp.float32)
    torch_norm = torch.nn.GroupNorm(norm.num_groups, ch, eps=norm.epsilon)
    graphdef, params = nnx.split(norm)
    for implementation, call in (("ours", layers.GroupNorm.__call__), ("flax", nnx.GroupNorm.__call__)):
      yield (f"group norm + SiLU {r}x{r}x{ch} ({implementation})",
             lambda p, x, g=graphdef, c=call: nnx.silu(c(nnx.merge(g, p), x)), (params, jnp.asarray(x)),
             lambda x, n=torch_norm: torch.nn.functional.silu(n(x)), (x_nchw,), channels_last)
    if level not in m.attention_levels:
      continue
    head_dim = ch // m.heads
    for kind, keys in (("self", r * r), ("cross", config.text.max_length)):
      q, k, v = (normal(batch, tokens, m.heads, head_dim) for tokens in (r * r, keys, keys))
      heads_first = tuple(as_torch(t.transpose(0, 2, 1, 3)) for t in (q, k, v))
      for implementation in ("folded", "xla"):
        ours = lambda q, k, v, i=implementation: attention.dot_product_attention(q, k, v, implementation=i)
        yield (f"{kind}-attention {r * r}x{keys} tokens, {m.heads} heads of {head_dim} ({implementation})", ours,
               tuple(map(jnp.asarray, (q, k, v))), torch.nn.functional.scaled_dot_product_attention, heads_first,
               lambda y: y.transpose(1, 2))


def table(config, repeats: int) -> str:
  import torch

  lines = [f"torch {torch.__version__} with {torch.get_num_threads()} threads, batch {config.train.batch_size}", "",
           "| operation | ours fwd ms | PyTorch fwd ms | ours fwd+bwd ms | PyTorch fwd+bwd ms | "
           "speed fwd | speed fwd+bwd |", "|---|---|---|---|---|---|---|"]
  for name, ours, ours_args, theirs, theirs_args, _ in cases(config):
    ours_fwd, ours_both = jax_times(ours, ours_args, repeats)
    theirs_fwd, theirs_both = torch_times(theirs, theirs_args, repeats)
    lines.append(f"| {name} | {ours_fwd * 1e3:.1f} | {theirs_fwd * 1e3:.1f} | {ours_both * 1e3:.1f} | "
                 f"{theirs_both * 1e3:.1f} | {theirs_fwd / ours_fwd:.2f} | {theirs_both / ours_both:.2f} |")
  return "\n".join(lines)
