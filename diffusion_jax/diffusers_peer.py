"""The PyTorch peers of the benchmarks: diffusers' UNet2DConditionModel for our U-Net and its
PixArtTransformer2DModel (PixArt-alpha: a DiT with text cross-attention) for our DiT, at a size matched to ours;
for Wan's transformer (model.backbone='wan') diffusers' WanTransformer3DModel of the same checkpoint
(model.wan_path), the same network, which runs on clips [batch, channels, frames, h, w]; for Stable Diffusion's
U-Net (model.backbone='sd_unet') diffusers' UNet2DConditionModel of the same checkpoint (model.sd_unet_path); for
SD3's and Flux's transformers (model.backbone='sd3', 'flux') diffusers' SD3Transformer2DModel and
FluxTransformer2DModel of the same checkpoint (model.sd3_path, model.flux_path), given zeros as the pooled text
embedding (and Flux, the pipelines' packed latents and token ids, guidance 3.5 where it reads one).

Needs torch and diffusers (the `test` extra). The peer U-Net gets our widths, resolution, attention
levels (cross-attention blocks where ours attend), group-norm groups and time-embedding width; its depth
(`layers_per_block`) is the candidate whose parameter count is closest to ours (both are printed). The peer
transformer gets our width, heads, patch size, resolution and text width; its number of blocks is the one whose
parameter count is closest to ours (PixArt's blocks share one adaLN projection where ours each have their own,
and its feed-forward is a 4x GELU where ours is a GEGLU of model.ff_mult). Its train step is forward + backward
+ AdamW on the v-prediction MSE, its sampler the diffusers DPM-Solver++(2M) scheduler loop with
classifier-free guidance (conditional and unconditional halves in one batch), as diffusers' pipelines do.
The peer runs on the GPU when torch sees one (else the CPU), under bfloat16 autocast when our model computes in
bfloat16 (model.dtype), its weights float32 as ours are.
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


def transformer_builder(model_config, resolution: int):
  """num_layers -> a diffusers PixArtTransformer2DModel with our DiT config's width, heads and patches."""
  import diffusers
  import torch

  def build(num_layers):
    torch.manual_seed(0)
    return diffusers.PixArtTransformer2DModel(
        num_attention_heads=model_config.heads, attention_head_dim=model_config.channels // model_config.heads,
        in_channels=model_config.in_channels, out_channels=model_config.in_channels, num_layers=num_layers,
        cross_attention_dim=model_config.channels, caption_channels=model_config.text_dim,
        sample_size=resolution, patch_size=model_config.patch_size)

  return build


SAME_CHECKPOINT = {"wan": ("WanTransformer3DModel", "wan_path"), "sd_unet": ("UNet2DConditionModel", "sd_unet_path"),
                   "sd3": ("SD3Transformer2DModel", "sd3_path"), "flux": ("FluxTransformer2DModel", "flux_path")}


def twin(path, class_name: str):
  """diffusers' model `class_name` of a local checkpoint directory (its weights read directly: diffusers'
  from_pretrained needs accelerate for some classes)."""
  import diffusers
  import safetensors.torch

  from diffusion_jax.models import diffusers_directory

  cls = getattr(diffusers, class_name)
  model = cls.from_config(cls.load_config(str(path)))
  weights = {}
  for file in diffusers_directory.weight_files(path):
    weights.update(safetensors.torch.load_file(file))
  model.load_state_dict(weights)
  return model


def count(module) -> int:
  return sum(p.numel() for p in module.parameters())


def closest(model_config, resolution: int, ours: int):
  """The peer whose parameter count is nearest to `ours`: a U-Net with depths 1, 2 or ours per level, or a
  transformer with 1 to twice our number of blocks; for Wan's and Stable Diffusion's, the checkpoint's own."""
  if model_config.backbone in SAME_CHECKPOINT:
    class_name, field = SAME_CHECKPOINT[model_config.backbone]
    return twin(model_config[field], class_name)
  if model_config.backbone == "dit":
    build, depths = transformer_builder(model_config, resolution), range(1, 2 * model_config.depth + 1)
  else:
    build, depths = builder(model_config, resolution), (1, 2, tuple(model_config.num_res_blocks))
  return min((build(depth) for depth in depths), key=lambda m: abs(count(m) / ours - 1))


def name(module, backbone: str) -> str:
  """The peer of our `backbone` (model.backbone) and its depth, for the table's heading."""
  if is_wan(module):
    return f"WanTransformer3DModel, the same checkpoint (num_layers={module.config.num_layers})"
  if backbone == "sd_unet":
    return f"UNet2DConditionModel, the same checkpoint (layers_per_block={module.config.layers_per_block})"
  if is_mmdit(module):
    single = f", {module.config.num_single_layers} single" if is_flux(module) else ""
    return f"{type(module).__name__}, the same checkpoint (num_layers={module.config.num_layers}{single})"
  if is_transformer(module):
    return f"PixArtTransformer2DModel, num_layers={module.config.num_layers}"
  return f"UNet2DConditionModel, layers_per_block={module.config.layers_per_block}"


def is_transformer(module) -> bool:
  import diffusers

  return isinstance(module, diffusers.PixArtTransformer2DModel)


def is_wan(module) -> bool:
  import diffusers

  return isinstance(module, diffusers.WanTransformer3DModel)


def is_flux(module) -> bool:
  import diffusers

  return isinstance(module, diffusers.FluxTransformer2DModel)


def is_mmdit(module) -> bool:
  """Whether the peer is SD3's or Flux's transformer (text and image tokens in one attention)."""
  import diffusers

  return isinstance(module, (diffusers.SD3Transformer2DModel, diffusers.FluxTransformer2DModel))


def text_width(module) -> int:
  if is_wan(module):
    return module.config.text_dim
  if is_mmdit(module):
    return module.config.joint_attention_dim
  return module.config.caption_channels if is_transformer(module) else module.config.cross_attention_dim


def input_shape(module, batch: int, size: int | tuple[int, int], frames: int) -> tuple:
  """What the peer denoises: [batch, channels, h, w], or clips [batch, channels, frames, h, w] for Wan's; size:
  (h, w), or the side of a square."""
  side = (size, size) if isinstance(size, int) else tuple(size)
  channels = module.config.in_channels // (4 if is_flux(module) else 1)  # (Flux's in_channels: 2 x 2 packed)
  return (batch, channels) + ((frames,) if is_wan(module) else ()) + side


def device() -> str:
  """Where the peer runs: 'cuda' when torch sees a GPU, else 'cpu'."""
  import torch

  return "cuda" if torch.cuda.is_available() else "cpu"


def described(where: str) -> str:
  """The peer's device for the table: the GPU's name, or the CPU threads torch uses."""
  import torch

  return torch.cuda.get_device_name() if where == "cuda" else f"the CPU with {torch.get_num_threads()} threads"


def synchronized(where: str) -> float:
  """time.perf_counter() once the work queued on `where` has finished (CUDA kernels run asynchronously)."""
  import torch

  if where == "cuda":
    torch.cuda.synchronize()
  return time.perf_counter()


def mixed_precision(where: str, dtype: str):
  """bfloat16 autocast on `where` when our model computes in bfloat16 (model.dtype); else it changes nothing."""
  import torch

  return torch.autocast(where, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def denoise(module, x, timesteps, text):
  """The peer's prediction for x [batch, c, (frames,) h, w] at diffusers timesteps [batch] and text [batch, tokens,
  width]."""
  if is_wan(module):
    return module(x, timestep=timesteps, encoder_hidden_states=text).sample
  if is_mmdit(module):  # (a pooled embedding of zeros: its value does not change the cost)
    pooled = x.new_zeros(x.shape[0], module.config.pooled_projection_dim)
    if not is_flux(module):
      return module(x, encoder_hidden_states=text, pooled_projections=pooled, timestep=timesteps).sample
    return flux_denoise(module, x, timesteps, text, pooled)
  if is_transformer(module):  # no resolution / aspect-ratio conditions (PixArt uses them only at 1024 px)
    return module(x, encoder_hidden_states=text, timestep=timesteps,
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
  c = module.config
  added = None  # SDXL's U-Net also reads a pooled embedding and size / crop ids (their values do not change its cost)
  if getattr(c, "addition_embed_type", None) == "text_time":
    added = {"text_embeds": x.new_zeros(x.shape[0], c.projection_class_embeddings_input_dim
                                        - 6 * c.addition_time_embed_dim), "time_ids": x.new_ones(x.shape[0], 6)}
  return module(x, timesteps, encoder_hidden_states=text, added_cond_kwargs=added).sample


def flux_denoise(module, x, timesteps, text, pooled):
  """diffusers' Flux transformer on latents x [batch, c, h, w] as FluxPipeline calls it: packed 2 x 2, the image
  tokens' ids (0, row, column), the text's 0, its timestep the sigma (timesteps / 1000), guidance 3.5 where the
  model reads one; unpacked back."""
  import diffusers
  import torch

  b, c, h, w = x.shape
  packed = diffusers.FluxPipeline._pack_latents(x, b, c, h, w)
  image_ids = diffusers.FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
  guidance = torch.full((b,), 3.5, device=x.device) if module.config.guidance_embeds else None
  out = module(packed, encoder_hidden_states=text, pooled_projections=pooled, timestep=timesteps / 1000,
               img_ids=image_ids, txt_ids=torch.zeros(text.shape[1], 3, device=x.device), guidance=guidance).sample
  return diffusers.FluxPipeline._unpack_latents(out, 2 * h, 2 * w, 2)  # (pixel sizes at a VAE factor of 2)


def train_step_seconds(module, batch: int, size: int | tuple[int, int], tokens: int, steps: int,
                       dtype: str = "float32", frames: int = 1) -> float:
  """Seconds per forward + backward + AdamW step (after two warm-up steps) on input_shape's inputs; dtype: our
  model.dtype; frames: of a video peer's clips."""
  import torch

  where = device()
  module.to(where).train()
  optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
  generator = torch.Generator(device=where).manual_seed(0)
  normal = lambda *shape: torch.randn(*shape, generator=generator, device=where)
  x0 = normal(*input_shape(module, batch, size, frames))
  text = normal(batch, tokens, text_width(module))

  def step():
    t = torch.rand(batch, generator=generator, device=where)
    per_example = (-1,) + (1,) * (x0.ndim - 1)
    alpha, sigma = torch.cos(t * np.pi / 2).view(per_example), torch.sin(t * np.pi / 2).view(per_example)
    eps = normal(*x0.shape)
    with mixed_precision(where, dtype):
      output = denoise(module, alpha * x0 + sigma * eps, t * 1000, text)
      loss = torch.mean((output.float() - (alpha * eps - sigma * x0)) ** 2)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()

  for _ in range(2):
    step()
  start = synchronized(where)
  for _ in range(steps):
    step()
  return (synchronized(where) - start) / steps


def sampling_images_per_s(module, batch: int, size: int | tuple[int, int], tokens: int, sampler_steps: int,
                          guidance_scale: float, repeats: int = 2, dtype: str = "float32", frames: int = 1) -> float:
  """Images (a video peer: clips) per second of the diffusers DPM-Solver++(2M) loop with classifier-free guidance
  (after one warm-up); dtype: our model.dtype."""
  import diffusers
  import torch

  where = device()
  module.to(where).eval()
  scheduler = diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
                                                    prediction_type="v_prediction")
  generator = torch.Generator(device=where).manual_seed(0)
  text = torch.randn(batch, tokens, text_width(module), generator=generator, device=where)
  both = torch.cat([text, torch.zeros_like(text)])

  @torch.no_grad()
  def run():
    scheduler.set_timesteps(sampler_steps, device=where)
    x = torch.randn(*input_shape(module, batch, size, frames), generator=generator, device=where)
    for t in scheduler.timesteps:
      with mixed_precision(where, dtype):
        prediction = denoise(module, torch.cat([x, x]), t.expand(2 * batch), both).float()
      conditional, unconditional = prediction.chunk(2)
      x = scheduler.step(unconditional + guidance_scale * (conditional - unconditional), t, x).prev_sample
    return x

  run()
  start = synchronized(where)
  for _ in range(repeats):
    run()
  return batch * repeats / (synchronized(where) - start)
