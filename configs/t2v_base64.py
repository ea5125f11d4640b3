"""Imagen Video-like base model for a pod: 16 frames of 64x64, frozen T5 v1.1 XXL text encoder and a
space-time factorised U-Net (temporal convolution after every block, temporal attention at 16x16 and
below), FSDP over all devices, joint image-video training.

  launch/tpu_pod.sh NAME ZONE --config=configs/t2v_base64.py --workdir=/mnt/shared/runs/t2v64 \\
      --config.text.pretrained_path=/path/to/t5-v1_1-xxl --config.text.spiece_path=/path/to/spiece.model \\
      --config.data.dataset=tfds --config.data.name=YOUR_VIDEO_DATASET --config.data.image_key=video \\
      --config.data.data_dir=/mnt/shared/tfds

Inflating a trained imagen_base64 checkpoint: `--config.inflate.image_workdir=/mnt/shared/runs/base64`
(both use the same U-Net widths, so every spatial weight carries over).
"""

from configs import imagen_base64


def get_config(variant: str = ""):
  config = imagen_base64.get_config("fsdp")
  config.data.update(image_key="video", frames=16, image_fraction=0.2, random_flip=False)
  config.model.update(temporal=True, max_frames=16)
  config.train.update(batch_size=256, steps=500_000)
  if variant == "temporal_only":
    config.inflate.train_temporal_only = True
  elif variant:
    raise ValueError(f"Unknown t2v_base64 variant {variant!r}; valid variants: 'temporal_only'.")
  return config
