"""Imagen-like 64x64 base model: frozen T5 v1.1 XXL text encoder + a ~2B-parameter U-Net, sized for a pod.

  launch/tpu_pod.sh NAME ZONE --config=configs/imagen_base64.py:fsdp --workdir=/mnt/shared/runs/base64 \\
      --config.text.pretrained_path=/path/to/t5-v1_1-xxl --config.text.spiece_path=/path/to/spiece.model \\
      --config.data.dataset=tfds --config.data.name=YOUR_DATASET --config.data.data_dir=/mnt/shared/tfds

Variants: `dp` (pure data parallel: every device holds all weights), `fsdp` (parameters and optimizer
state sharded over all devices; the default for this size), `fsdp_tp` (FSDP x 4-way tensor parallel).
"""

from configs import base


def get_config(variant: str = "fsdp"):
  config = base.get_config()
  config.data.resolution = 64
  config.data.random_flip = True
  config.text.tokenizer = "sentencepiece"
  config.text.max_length = 128
  config.text.trainable = False
  # T5 v1.1 XXL encoder (used when text.pretrained_path is empty, e.g. for shape-only dry runs).
  config.text.t5.update(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                        gated=True, dtype="bfloat16")
  config.model.update(channels=512, channel_mults=(1, 2, 3, 4), num_res_blocks=(3, 3, 3, 2),
                      attention_levels=(1, 2, 3), heads=8, ff_mult=2, text_dim=4096, skips="block",
                      dtype="bfloat16", remat=True, remat_policy="matmuls")
  config.diffusion.update(prediction="eps", weighting="eps_mse", cond_drop_prob=0.1)
  config.optimizer.update(learning_rate=1e-4, warmup_steps=10000, schedule="constant")
  config.train.update(batch_size=2048, steps=2_500_000, ema_decays=(0.9999,), checkpoint_every=5000)
  config.sample.update(guidance_scale=5.0, threshold="dynamic")
  if variant == "dp":
    config.mesh.update(data=-1, fsdp=1, tensor=1)
  elif variant == "fsdp":
    config.mesh.update(data=1, fsdp=-1, tensor=1)
  elif variant == "fsdp_tp":
    config.mesh.update(data=1, fsdp=-1, tensor=4)
  else:
    raise ValueError(f"Unknown imagen_base64 variant {variant!r}; valid variants: 'dp', 'fsdp', 'fsdp_tp'.")
  return config
