"""The model's operations one at a time, ours (JAX, jitted) against PyTorch's at the same shapes.

Says where the train-step gap to diffusers (`bench peer`) comes from. For every level of the config's
U-Net (the training images' sides / 2^level, channels * mult, batch train.batch_size): a 3x3 convolution and group norm
+ SiLU (layers.GroupNorm and flax's own); at the attention levels, self-attention over the level's pixels
and cross-attention to text.max_length tokens (each in models/attention.py's "folded" and "xla"
implementations). For a DiT (model.backbone='dit'), at its patch tokens and width: a linear layer, the
LayerNorm its adaLN modulates, the GEGLU feed-forward, and self- and cross-attention as above. Each is timed
forward and forward + backward (the gradient of the sum of squared outputs with respect to the inputs and
weights). PyTorch runs diffusers' layout (NCHW) and its own kernels: oneDNN convolutions and matrix products,
and the fused `scaled_dot_product_attention`.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax.data import pipeline
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
  operation of the config's U-Net or DiT; both compute the same function (weights copied from ours)."""
  return dit_cases(config) if config.model.backbone == "dit" else unet_cases(config)


def _random_normal():
  rng = np.random.default_rng(0)
  return lambda *shape: rng.standard_normal(shape, dtype=np.float32)


def _as_torch(x):
  import torch

  return torch.tensor(np.ascontiguousarray(x), requires_grad=True)


def _torch_linear(linear):
  """A torch.nn.Linear holding our nnx.Linear's weights."""
  import torch

  copy = torch.nn.Linear(*linear.kernel.shape)
  with torch.no_grad():
    copy.weight.copy_(torch.tensor(np.asarray(linear.kernel[...]).T))
    copy.bias.copy_(torch.tensor(np.asarray(linear.bias[...])))
  return copy


def _applied(module):
  """(function of (params, x), params) for an nnx module: its parameters are differentiated too."""
  graphdef, params = nnx.split(module)
  return (lambda p, *x: nnx.merge(graphdef, p)(*x)), params


def attention_cases(normal, kind, batch, tokens, keys, heads, head_dim):
  """`kind` ("self" / "cross") attention of `tokens` queries to `keys` keys, both implementations of ours against
  PyTorch's fused one."""
  import torch

  q, k, v = (normal(batch, n, heads, head_dim) for n in (tokens, keys, keys))
  heads_first = tuple(_as_torch(t.transpose(0, 2, 1, 3)) for t in (q, k, v))
  for implementation in ("folded", "xla"):
    ours = lambda q, k, v, i=implementation: attention.dot_product_attention(q, k, v, implementation=i)
    yield (f"{kind}-attention {tokens}x{keys} tokens, {heads} heads of {head_dim} ({implementation})", ours,
           tuple(map(jnp.asarray, (q, k, v))), torch.nn.functional.scaled_dot_product_attention, heads_first,
           lambda y: y.transpose(1, 2))


def unet_cases(config):
  import torch

  batch, (height, width), m = config.train.batch_size, pipeline.image_size(config.data), config.model
  normal = _random_normal()
  channels_last = lambda y: y.permute(0, 2, 3, 1)
  for level, mult in enumerate(m.channel_mults):
    h, w, ch = height // 2 ** level, width // 2 ** level, m.channels * mult
    x = normal(batch, h, w, ch)
    x_nchw = _as_torch(x.transpose(0, 3, 1, 2))
    conv = layers.conv(ch, ch, 3, nnx.Rngs(0), jnp.float32)
    torch_conv = torch.nn.Conv2d(ch, ch, 3, padding=1)
    with torch.no_grad():
      torch_conv.weight.copy_(torch.tensor(np.asarray(conv.kernel[...]).transpose(3, 2, 0, 1)))
      torch_conv.bias.copy_(torch.tensor(np.asarray(conv.bias[...])))
    apply, params = _applied(conv)
    yield (f"3x3 convolution {h}x{w}x{ch}", apply, (params, jnp.asarray(x)), torch_conv, (x_nchw,), channels_last)
    norm = layers.group_norm(ch, nnx.Rngs(0), jnp.float32)
    torch_norm = torch.nn.GroupNorm(norm.num_groups, ch, eps=norm.epsilon)
    graphdef, params = nnx.split(norm)
    for implementation, call in (("ours", layers.GroupNorm.__call__), ("flax", nnx.GroupNorm.__call__)):
      yield (f"group norm + SiLU {h}x{w}x{ch} ({implementation})",
             lambda p, x, g=graphdef, c=call: nnx.silu(c(nnx.merge(g, p), x)), (params, jnp.asarray(x)),
             lambda x, n=torch_norm: torch.nn.functional.silu(n(x)), (x_nchw,), channels_last)
    if level in m.attention_levels:
      yield from attention_cases(normal, "self", batch, h * w, h * w, m.heads, ch // m.heads)
      yield from attention_cases(normal, "cross", batch, h * w, config.text.max_length, m.heads, ch // m.heads)


def dit_cases(config):
  import torch

  from diffusion_jax.models import dit

  batch, m = config.train.batch_size, config.model
  rows, columns = (side // m.patch_size for side in pipeline.image_size(config.data))
  tokens, width = rows * columns, m.channels
  normal = _random_normal()
  x = normal(batch, tokens, width)
  x_torch, same_layout = _as_torch(x), lambda y: y
  linear = layers.dense(width, width, (None, None), nnx.Rngs(0), jnp.float32)
  apply, params = _applied(linear)
  yield (f"linear {tokens} tokens x {width} -> {width}", apply, (params, jnp.asarray(x)), _torch_linear(linear),
         (x_torch,), same_layout)
  norm = dit.plain_layer_norm(width, nnx.Rngs(0), jnp.float32)
  yield (f"layer norm {tokens} tokens x {width}", lambda x: norm(x), (jnp.asarray(x),),
         lambda x: torch.nn.functional.layer_norm(x, (width,), eps=norm.epsilon), (x_torch,), same_layout)
  ff = layers.FeedForward(width, m.ff_mult, dtype=jnp.float32, rngs=nnx.Rngs(0), zero_out=False)
  proj_in, proj_out = _torch_linear(ff.proj_in), _torch_linear(ff.proj_out)

  def torch_ff(x):
    h, gate = proj_in(x).chunk(2, dim=-1)
    return proj_out(h * torch.nn.functional.gelu(gate, approximate="tanh"))

  apply, params = _applied(ff)
  yield (f"GEGLU feed-forward {tokens} tokens x {width}, {m.ff_mult}x", apply, (params, jnp.asarray(x)), torch_ff,
         (x_torch,), same_layout)
  yield from attention_cases(normal, "self", batch, tokens, tokens, m.heads, width // m.heads)
  yield from attention_cases(normal, "cross", batch, tokens, config.text.max_length, m.heads, width // m.heads)


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
