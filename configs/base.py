"""Defaults for every experiment. Experiments import this and change what differs.

Every default lives here; code never invents one. `diffusion_jax.config_checks.validate` checks a
config before anything compiles. A field added here also goes into `diffusion_jax.checkpoint.ADDED_FIELDS`
with the value that means what the code did before it existed, so workdirs written earlier still load.
"""

import json
import os

import ml_collections


def checkpoint_root(root: str):
  """(part, read) of a diffusers checkpoint's root directory (the variant of a config that fine-tunes one):
  part(*names) the path of a file or folder in it ('' without a root, for the command line to give); read(*names)
  a JSON file in it as a dict ({} without a root or that file; a ValueError naming a file that is not JSON)."""
  part = lambda *names: os.path.join(os.path.expanduser(root), *names) if root else ""

  def read(*names) -> dict:
    if not (root and os.path.isfile(part(*names))):
      return {}
    with open(part(*names), "rb") as file:
      try:
        return json.load(file)
      except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{part(*names)!r} cannot be read as JSON (damaged, cut short or another format): "
                         f"{error}") from None

  return part, read


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0

  # Data: captioned_shapes (built in) or any TFDS dataset prepared as array_record.
  c.data = dict(
      dataset="captioned_shapes",  # captioned_shapes, moving_shapes, folder (images), folder_clips (videos), tfds
      name="",                     # TFDS name when dataset == "tfds"
      folder="",                   # image (clip) folder when dataset == "folder" ("folder_clips")
      captions_file="",            # captions.jsonl / .csv when dataset == "folder" or "folder_clips"
      eval_captions_file="",       # ... of held-out files of the folder: the validation split evaluation reads
      frame_stride=1,              # folder_clips: keep every this many-th frame (2: 30 fps clips at 15 fps)
      data_dir="~/tensorflow_datasets",
      image_key="image",
      caption_key="caption",
      attribute_keys=(),           # extra integer features passed through to the batch
      reference_key="",            # the feature holding each image's reference image, read beside it in training:
                                   # FLUX.1 Kontext's (model.flux_kontext) edit source, FLUX.1 Depth / Canny's
                                   # control image; a folder dataset's is "reference" (its captions' "reference"
                                   # files); "": none
      resolution=32,               # the training images' side (with data.width: their height)
      width=0,                     # the training images' width (0: data.resolution, a square); folder,
                                   # folder_clips and tfds data are scaled to cover it and cropped (Wan: 480 x 832)
      max_objects=2,               # captioned_shapes only
      heldout_combinations=(),     # captioned_shapes only: colour-shape pairs ("red square") kept out of the
                                   # train split; evaluation also judges captions that name them
      frames=8,                    # moving_shapes only
      wrap_around=False,           # moving_shapes only: a shape leaving one edge comes back at the other
      travel=0.45,                 # moving_shapes only: fraction of the frame a clip's object crosses
      image_fraction=0.0,          # video data: fraction of examples replaced by a still frame (joint
                                   # image-video training; the temporal layers are off for those)
      num_train=20000,             # built-in datasets: training examples
      num_eval=1000,               # built-in datasets: validation and test examples
      seed=0,                      # built-in datasets: generation seed
      random_crop=False,
      random_flip=False,           # never for captions that name left/right
      size_ids=False,              # SDXL: each image's original size and crop as its U-Net's time ids (else the
                                   # training size, uncropped, as sampling's)
      aesthetic_score=0.0,         # the SDXL refiner: the training images' aesthetic score, its U-Net's last time
                                   # id (its pipeline's 6 for sampling; 0: a U-Net that reads none, SDXL base's)
      worker_count=0,              # grain worker processes (0 = in the main process)
  )

  # Text: a T5 encoder, trained from scratch (pretrained_path empty) or loaded from a local HF checkpoint.
  c.text = dict(
      tokenizer="words",           # 'words' (dataset vocabulary), 'sentencepiece' or 'clip' (CLIP's BPE)
      spiece_path="",              # sentencepiece model for tokenizer == 'sentencepiece' (SD3, Flux: their T5's)
      tokenizer_path="",           # local CLIP tokenizer directory for tokenizer == 'clip' (SD's tokenizer/)
      second_tokenizer_path="",    # SDXL's (and SD3's) second CLIP tokenizer (tokenizer_2/): text_ids hold both
                                   # tokenizers' ids
      max_length=32,
      pretrained_path="",          # local Hugging Face T5 (or UMT5) directory; empty = random init
      second_encoder_path="",      # SDXL's (SD3's) second CLIP text encoder (text_encoder_2/), with pretrained_path's
      t5_encoder_path="",          # SD3's T5 encoder (text_encoder_3/; empty: its tokens zeros, as SD3's pipelines
                                   # without it), Flux's (text_encoder_2/)
      t5_max_length=256,           # SD3, Flux: the T5 tokens of a prompt (their pipelines' max_sequence_length)
      trainable=True,              # False freezes the encoder (Imagen)
      embedding_cache="",          # directory of cached frozen-encoder embeddings (built on first use)
      # position_bias_init (random init only): 't5' (random normal) or 'local' (each word starts mixed with
      # its neighbours; models/t5.py local_position_bias). per_layer_position_bias: UMT5's layout, a
      # relative-position bias table in every layer (T5: one, in the first); read from a checkpoint's config.json.
      t5=dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6, num_buckets=32,
              max_distance=128, position_bias_init="t5", gated=True, layer_norm_epsilon=1e-6, dtype="float32",
              per_layer_position_bias=False),
  )

  # U-Net or DiT (diffusion_jax/models/unet.py and dit.py document each field).
  c.model = dict(
      channels=64, channel_mults=(1, 2, 4), num_res_blocks=(2, 2, 2), attention_levels=(1, 2), skips="block",
      skip_scale=1.0, heads=4, ff_mult=2, dropout=0.0, text_dim=512, in_channels=3, dtype="float32",
      remat=False,                 # recompute each block's forward pass in the backward pass (less activation memory)
      remat_policy="full",         # with remat: 'full' recomputes all of it; 'matmuls' keeps every convolution's and
                                   # projection's output and recomputes the rest (norms, activations, attention scores)
      lowres_conditioning=False, temporal=False, max_frames=16, coordinate_channels=False,
      attention="auto",            # models/attention.py: auto (folded on CPU, cudnn or xla on GPU), folded, xla, cudnn
      backbone="unet",             # 'unet' (models/unet.py), 'dit' (models/dit.py), 'wan' (Wan's, wan_path),
                                   # 'sd_unet' (Stable Diffusion's U-Net, sd_unet_path), 'sd3' (SD3's MMDiT, sd3_path)
                                   # or 'flux' (Flux's transformer, flux_path)
      sd_unet_path="",             # sd_unet: local diffusers UNet2DConditionModel directory (structure and weights)
      sd3_path="",                 # sd3: local diffusers SD3Transformer2DModel directory (structure and weights)
      flux_path="",                # flux: local diffusers FluxTransformer2DModel directory (structure and weights)
      flux_guidance=3.5,           # flux with guidance_embeds (FLUX.1 dev): the guidance scale it is told to follow,
                                   # in training and sampling (its pipelines' guidance_scale; not classifier-free)
      flux_redux_path="",          # flux: a FLUX.1 Redux root (image_encoder/, feature_extractor/, image_embedder/):
                                   # sampling reads --init_image as an image to vary, its tokens after the prompt's
      flux_kontext=False,          # flux: FLUX.1 Kontext, whose sampling reads --init_image as a reference image
                                   # (its tokens beside the image's), not as an image to edit
      wan_path="",                 # wan: local diffusers WanTransformer3DModel directory (its structure and weights)
      wan_low_noise_path="",       # wan: a second one, the expert for low noise (Wan 2.2 A14B's transformer_2/)
      wan_boundary=0.875,          # with wan_low_noise_path: sigma below which (timestep / 1000) its expert denoises
      wan_image_encoder_path="",   # wan 2.1 image-to-video: local transformers CLIPVisionModel dir (image_encoder/)
      wan_expert_batches="routed",  # with wan_low_noise_path: 'routed' draws each batch's noise levels on one side
                                   # of the boundary (one expert a step), 'mixed' each example's (both experts a step)
      wan_clean_first_frame=False,  # wan: clips may start at a given image, its latent frame read clean at timestep 0
                                   # (Wan 2.2 TI2V 5B's image-to-video mode, diffusers' expand_timesteps)
      wan_first_frame_fraction=0.0,  # with wan_clean_first_frame: the share of training clips given their first frame
      patch_size=2,                # dit: patch side in pixels
      depth=12,                    # dit: transformer blocks (its width is `channels`)
      position_max_period=10000.0,  # dit: longest patch-position sinusoid period / 2pi, in patches (DiT: 1e4)
      video_attention="factorised",  # video dit: 'factorised' (temporal layers) or 'spacetime' (full attention)
      temporal_patch_size=1,       # spacetime dit: frames per token (tubelets of that many frames x patch_size^2)
      lora_rank=0,                 # > 0: low-rank updates of every attention projection, the only weights trained
      lora_convolutions=False,     # with lora_rank: also of both 3x3 convolutions of every U-Net residual block
                                   # (a video U-Net: and both convolutions of every temporal block)
      lora_feed_forward=False,     # with lora_rank: also of both feed-forward projections of every transformer block
      lora_text_encoder=False,     # with lora_rank: also of a CLIP text encoder's (SD's, SDXL's two) attention and MLP
      lora_modulation=False,       # with lora_rank: also of the projections of the conditioning embedding (noise
                                   # level, pooled text) to every block's scale and shift (U-Net residual and
                                   # temporal blocks' FiLM, DiT adaLN)
  )

  # Diffusion process and training objective (schedules.py, objectives.py).
  c.diffusion = dict(
      path="vp",                   # 'vp' or 'flow'
      schedule="cosine",           # schedules.CONTINUOUS_SCHEDULES
      schedule_params=ml_collections.ConfigDict(dict(logsnr_min=-15.0, logsnr_max=15.0)),
      prediction="v",              # eps, x0, v, flow, edm
      weighting="v_mse",           # eps_mse, v_mse, x0_mse, min_snr, edm, flow_mse (|v_hat - v|^2 of flow)
      min_snr_gamma=5.0,
      sigma_data=0.5,
      time_sampler="uniform",      # uniform, log_normal, logit_normal
      time_mean=0.0,
      time_std=1.0,
      cond_drop_prob=0.1,          # classifier-free guidance training
  )

  # Fine-tuning (finetune.py): start from another run's weights (same model) with a fresh optimizer, step count,
  # schedule and data; e.g. on other data, or at a higher resolution (progressive resolution training).
  c.finetune = dict(
      workdir="",                  # training workdir of the run to start from; empty = random initialisation
      step=-1,                     # its checkpoint step; -1 = latest
      use_ema=True,                # take the first EMA copy of its weights
  )

  # Progressive distillation (distillation.py): with steps > 0 this run is a fine-tune of finetune.workdir (the
  # teacher) whose student learns to sample in `steps` DDIM steps what the teacher samples in twice as many.
  c.distill = dict(
      steps=0,                     # the student's sampler steps (sample.steps, DDIM); 0 = no distillation
      guidance_scale=-1.0,         # the teacher's classifier-free guidance; -1: its run's sample.guidance_scale
                                   # (the teacher denoises as its run samples). The student of a guided teacher
                                   # samples at 1.
      threshold="",                # the teacher's thresholding (none, static, dynamic); "": its run's
                                   # sample.threshold
  )

  # Inflation (Make-A-Video): initialise a video model's spatial layers (and text encoder) from a trained
  # image model's checkpoint; the temporal layers start as the identity (see models/inflation.py).
  c.inflate = dict(
      image_workdir="",            # training workdir of the image model; empty = no inflation
      step=-1,                     # its checkpoint step; -1 = latest
      use_ema=True,                # take the first EMA copy of its weights
      train_temporal_only=False,   # freeze everything but the temporal layers
  )

  # Super-resolution stage of a cascade (model.lowres_conditioning=True; see superres.py): the U-Net also
  # sees the training image downsampled to lowres_resolution, noise-augmented to a random time in [0, aug_max].
  c.superres = dict(
      lowres_resolution=0,         # input size; 0 = not a super-resolution stage
      lowres_frames=0,             # video: input frames (temporal super-resolution); 0 = the stage's frames
      aug_max=0.5,                 # noise-conditioning augmentation: largest training time t_aug
      residual=False,              # diffuse the residual over the upsampled input instead of the image
      residual_scale=0.25,         # ... divided by this (about the residual's spread, to suit sigma_data)
  )

  # Latent diffusion (models/autoencoder.py): the model diffuses the latents of a frozen KL autoencoder
  # (Stable Diffusion's VAE) instead of pixels; model.in_channels must be its latent channels.
  c.latent = dict(
      autoencoder_path="",         # local diffusers AutoencoderKL directory; empty = diffuse pixels
      cache="",                    # directory of the training set's encoded posteriors (built on first use);
                                   # empty = encode every batch in the train step
  )

  # AdamW (optimizer.py). These numbers (and train.steps) are arguments of the compiled train step: runs that
  # differ only in them share one compiled program.
  c.optimizer = dict(
      learning_rate=3e-4,          # peak, reached at the end of the warm-up
      schedule="cosine",           # optimizer.SCHEDULES: cosine decay until train.steps, or constant
      warmup_steps=500,            # linear from 0 to the peak
      end_learning_rate_factor=0.1,  # cosine: the final learning rate / the peak
      b1=0.9, b2=0.99,             # decay rates of Adam's first and second moments
      weight_decay=0.0,            # decoupled (AdamW): scaled by the learning rate
      grad_clip=1.0,               # clip the gradient's global norm to this; 0: no clipping
  )

  c.train = dict(
      batch_size=64,               # global batch
      grad_accum=1,                # micro-batches per step
      steps=10000,
      ema_decays=(0.9999,),
      log_every=100,
      checkpoint_every=1000,
      keep_checkpoints=3,
      max_nonfinite=10,            # stop after this many non-finite steps in a row
      sample_at_end=True,          # main: sample config.sample.prompts once training is done
      sample_every=0,              # also every this many steps (samples/step_N, TensorBoard); 0: never
  )

  # Device mesh; -1 takes all remaining devices. Product must equal the device count. `sequence` splits a video
  # model's frames (Wan's tokens) over devices: sequence parallelism, for clips too large for one device.
  c.mesh = dict(data=-1, fsdp=1, sequence=1, tensor=1)

  # Sampling (used after training and by `python -m diffusion_jax.sample`). Static thresholding (x0 clipped
  # to [-1, 1]); dynamic thresholding is for high guidance scales (Imagen configs): on the built-in
  # datasets' saturated flat colours it desaturates samples (t2i_shapes, guidance 3: FID 25 vs 1.7 static).
  c.sample = dict(
      sampler="dpmpp_2m", steps=25, eta=0.0, guidance_scale=3.0, guidance_rescale=0.0, threshold="static",
      threshold_percentile=99.5, num_per_prompt=4, seed=0, use_ema=True, prompts=("a large red circle",),
      guidance_interval=(),        # (low, high): guide only where low < sigma/alpha <= high (EDM noise levels)
      guidance_scale_low_noise=-1.0,  # a pair of Wan experts: the low-noise expert's steps' scale (-1: guidance_scale)
      frames=0,                    # video models: frames per clip (0 = data.frames)
      flow_shift=0.0,              # flow schedule: the sampling grid's time shift (0: diffusion.schedule_params.shift;
                                   # Wan's pipelines: 3 at 480p, 5 at 720p)
      skip_layers=(),              # SD3: skip-layer guidance's blocks left out of a third pass (SD 3.5 Medium: (7, 8,
      skip_layer_scale=2.8,        # 9)), guided away from by skip_layer_scale at the steps i with
      skip_layer_start=0.01,       # steps x start < i < steps x stop (StableDiffusion3Pipeline's); (): off
      skip_layer_stop=0.2,
      flux_guidance=-1.0,          # FLUX.1 dev (guidance_embeds): the guidance scale it is told to follow
                                   # (-1: model.flux_guidance, what it trained with; its pipelines' guidance_scale)
      kontext_resize="preferred",  # FLUX.1 Kontext's reference images: "preferred", the resolution it trained at
                                   # nearest the image's aspect ratio (FluxKontextPipeline's), or "own", its own
                                   # size; either rounded down to a multiple of 2 latents
      redux_prompt_scale=1.0,      # FLUX.1 Redux: the scale of the prompt's T5 states and the image's tokens after
      redux_pooled_scale=1.0,      # them, and of the pooled CLIP embedding (FluxPriorReduxPipeline's
                                   # prompt_embeds_scale, pooled_prompt_embeds_scale): below 1, a looser variation
      resolution_shift=(),         # flow schedule, with flow_shift 0: (base_tokens, max_tokens, base_shift, max_shift),
                                   # the shift e^mu for the samples' token count (Flux's dynamic shift:
                                   # schedules.resolution_flow_shift); (): none
      timestep_spacing="",         # "": the schedule's grid, t from 1 to 0 in equal steps; "leading", "trailing",
      steps_offset=0,              # "linspace": a DDPM table's timesteps (linear, scaled_linear schedules) as
                                   # diffusers' Euler scheduler spaces them (DDIM's and PNDM's leading and
                                   # trailing ones too), leading ones + steps_offset (SD's pipelines: leading, 1)
      height=0, width=0,           # the sampling job's image size (0: data.resolution; training samples and
                                   # evaluation stay at it): any the network divides, e.g. Wan's 480 x 832
      aug_level=0.1,               # super-resolution stages: noise-augmentation time of the low-res input
      batch_size=256,              # samples generated at once over all devices (more: batch by batch)
      negative_prompt="",          # guidance's unconditional branch reads this text instead of the null one
      strength=0.8,                # image-to-image and inpainting (--init_image): the part of the grid run, (0, 1]
      aesthetic_score=6.0,         # the SDXL refiner: the aesthetic score id of guidance's conditional branch,
      negative_aesthetic_score=2.5,  # and of its other branch (its pipeline's defaults)
      edit_noise="random",         # edits start from: "random" noise (SDEdit), "inversion" (DDIM), "source_inversion"
                                   # or "null_text_inversion" (with a source prompt; editing.py)
      null_text_iterations=10,     # null_text_inversion: Adam steps on guidance's other text per sampler step
      null_text_learning_rate=0.01,  # ... and their learning rate
      video_length=0,              # video models: frames per video by autoregressive extension (0 = one clip)
      context_frames=0,            # ... frames of the video so far each window keeps (0 = half a clip; causal: 1 + 4 k)
      reconstruction_guidance=0.0,  # edits: > 0 also steers the generated part to agree with the kept (editing.py)
  )
  return c
