"""The built-in datasets' judges: a dataset's media (generated or reconstructed) read against its captions."""

from diffusion_jax.metrics import motion_judge, shapes_judge

JUDGES = {"captioned_shapes": shapes_judge, "moving_shapes": motion_judge}


def accuracy(config, media, captions, prefix: str = "accuracy/") -> dict:
  """{prefix + attribute: accuracy} of config.data.dataset's judge (JUDGES) on uint8 media [n, (frames,) h, w, 3]
  for their n `captions`; empty for a dataset without one."""
  if config.data.dataset not in JUDGES:
    return {}
  options = {"wrap_around": True} if config.data.wrap_around else {}  # moving_shapes on a torus
  return {f"{prefix}{k}": v for k, v in JUDGES[config.data.dataset].accuracy(media, captions, **options).items()}
