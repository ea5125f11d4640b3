"""The PyTorch peer of the benchmarks: diffusers' UNet2DConditionModel at a size matched to ours.

Needs torch and diffusers (the `test` extra). The peer U-Net gets our widths, resolution, attention
levels (cross-attention blocks where ours attend), group-norm groups and time-embedding width; its depth
(`layers_per_block`) is the candidate whose parameter count is closest to ours (both are printed).
Its train step is forward + backward + AdamW on the v-prediction MSE, its sampler the diffusers
DPM-Solver++(2M) scheduler loop with classifier-free guidance (conditional and unconditional halves in
one batch), as diffusers' pipelines do.
"""

import time

import numpy as np


def builder(model_config, resolution: int):
  """layers_per_block -> a diffusers UNet2DConditionModel with our config's widths and attention layout."""
  import diffusers
  import torch

  widths = tuple(model_config.channels * m for m in model_config.channel_mults)
  levels = range(len(widths))
  down = tuple("CrossAttnDownBlock2D" if i in model_config.attention_levels else "DownBlock2D" for i in levels)
  up = tuple("CrossAttnUpBlock2D" if i in model_config.attention_levels else "UpBlock2D" for i in reversed(levels))

  def build(layers_per_block):
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=resolution, in_channels=model_config.in_channels, out_channels=model_config.in_channels,
        down_block_types=down, up_block_types=up, block_out_channels=widths, layers_per_block=layers_per_block,
        cross_attention_dim=model_config.text_dim, attention_head_dim=model_config.heads,
        norm_num_groups=min(32, model_config.channels))

  return build


def count(module) -> int:
  return sum(p.numel() for p in module.parameters())


def closest(model_config, resolution: int, ours: int):
  """The peer whose parameter count is nearest to `ours`, trying depths 1, 2 and ours per level."""
  build = builder(model_config, resolution)
  candidates = [build(depth) for depth in (1, 2, tuple(model_config.num_res_blocks))]
  return min(candidates, key=lambda m: abs(count(m) / ours - 1))


def train_step_seconds(module, batch: int, resolution: int, tokens: int, steps: int) -> float:
  """Seconds per forward + backward + AdamW step (after two warm-up steps)."""
  import torch

  optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
  generator = torch.Generator().manual_seed(0)
  x0 = torch.randn(batch, module.config.in_channels, resolution, resolution, generator=generator)
  text = torch.randn(batch, tokens, module.config.cross_attention_dim, generator=generator)
  module.train()

  def step():
    t = torch.rand(batch, generator=generator)
    alpha, sigma = torch.cos(t * np.pi / 2)[:, None, None, None], torch.sin(t * np.pi / 2)[:, None, None, None]
    eps = torch.randn(x0.shape, generator=generator)
    output = module(alpha * x0 + sigma * eps, t * 1000, encoder_hidden_states=text).sample
    loss = torch.mean((output - (alpha * eps - sigma * x0)) ** 2)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()

  for _ in range(2):
    step()
  start = time.perf_counter()
  for _ in range(steps):
    step()
  return (time.perf_counter() - start) / steps


def sampling_images_per_s(module, batch: int, resolution: int, tokens: int, sampler_steps: int,
                          guidance_scale: float, repeats: int = 2) -> float:
  """Images/s of the diffusers DPM-Solver++(2M) loop with classifier-free guidance (after one warm-up)."""
  import diffusers
  import torch

  scheduler = diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
                                                    prediction_type="v_prediction")
  generator = torch.Generator().manual_seed(0)
  text = torch.randn(batch, tokens, module.config.cross_attention_dim, generator=generator)
  both = torch.cat([text, torch.zeros_like(text)])
  module.eval()

  @torch.no_grad()
  def run():
    scheduler.set_timesteps(sampler_steps)
    x = torch.randn(batch, module.config.in_channels, resolution, resolution, generator=generator)
    for t in scheduler.timesteps:
      conditional, unconditional = module(torch.cat([x, x]), t, encoder_hidden_states=both).sample.chunk(2)
      x = scheduler.step(unconditional + guidance_scale * (conditional - unconditional), t, x).prev_sample
    return x

  run()
  start = time.perf_counter()
  for _ in range(repeats):
    run()
  return batch * repeats / (time.perf_counter() - start)
