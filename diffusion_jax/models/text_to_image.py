"""The text-to-image network: T5 text encoder + U-Net, and its split into trainable / frozen parameters.

`TextToImage.encode(ids, mask)` -> text [batch, tokens, d_model]; `TextToImage(x, logsnr, text, mask)`
-> U-Net output. Parameters live outside the module as pure dicts (see train.py): `nnx.merge(graphdef,
params, frozen)` rebuilds the module inside a jitted function.
"""

from flax import nnx

from diffusion_jax.models import t5, unet


class TextToImage(nnx.Module):

  def __init__(self, config, *, rngs: nnx.Rngs):
    if config.text.pretrained_path:
      self.text_encoder = t5.load_hf_encoder(config.text.pretrained_path, config.text.t5.dtype)
    else:
      self.text_encoder = t5.T5Encoder(config.text.t5, rngs=rngs)
    self.unet = unet.UNet(config.model, rngs=rngs)

  def encode(self, ids, mask):
    return self.text_encoder(ids, mask)

  def __call__(self, x, logsnr, text, text_mask, dropout_key=None):
    return self.unet(x, logsnr, text, text_mask, dropout_key=dropout_key)


def trainable_filter(config):
  """Which parameters the optimizer updates: all, or all but the text encoder when it is frozen."""
  if config.text.trainable:
    return nnx.Param
  return nnx.All(nnx.Param, nnx.Not(nnx.PathContains("text_encoder")))


def split(model, config):
  """model -> (graphdef, trainable nnx.State, frozen nnx.State)."""
  return nnx.split(model, trainable_filter(config), ...)
