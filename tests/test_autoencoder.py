"""The latent-diffusion autoencoder: the function of diffusers' AutoencoderKL with the same weights (also those
saved under the old attention names); what it cannot read is refused with a reason; the abstract model reads
no weights; a latent text-to-image model trains on a (2, 2, 2) mesh without touching its pretrained parts, and
samples full-resolution images; the latent cache holds the encoder's posteriors and trains like the pixels; an
image autoencoder starts a temporal decoder that reconstructs as it does, and inflates into a causal one; the causal
3-D VAEs of HunyuanVideo, Wan and CogVideoX compute what diffusers' do."""

import json
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx, traverse_util

from configs import t2i_shapes
from diffusion_jax import config_checks, edit_inputs, sample, sharding, superres, train
from diffusion_jax.data import latent_cache, pipeline
from diffusion_jax.metrics import heldout_loss
from diffusion_jax.models import autoencoder, text_to_image
from diffusion_jax.text import tokenizers
from test_t5 import save_tiny_t5
from test_train import one_step


def saved_off_its_initialisation(model, directory) -> str:
  """Save a fresh diffusers `model` as diffusers does, every parameter first moved off its initial value (zero
  biases, unit norms) by 0.05 normal noise, so that a weight loaded into the wrong place shows; returns the path."""
  import torch

  with torch.no_grad():
    for parameter in model.parameters():
      parameter.add_(0.05 * torch.randn_like(parameter))
  model.save_pretrained(directory, safe_serialization=True)
  return str(directory)


@pytest.fixture(scope="session")
def vae(tmp_path_factory):
  """(directory, PyTorch model): a tiny random AutoencoderKL (2 levels, factor 2) saved as diffusers does."""
  import torch
  from diffusers import AutoencoderKL

  torch.manual_seed(0)
  model = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                        norm_num_groups=4, sample_size=16, scaling_factor=0.5, shift_factor=0.1)
  return saved_off_its_initialisation(model, tmp_path_factory.mktemp("vae")), model


@pytest.fixture(scope="session")
def temporal_vae(tmp_path_factory):
  """(directory, PyTorch model): a tiny random AutoencoderKLTemporalDecoder (Stable Video Diffusion's VAE layout;
  its group norms have 32 groups) saved as diffusers does, with random time-mixing weights."""
  import torch
  from diffusers import AutoencoderKLTemporalDecoder

  torch.manual_seed(0)
  model = AutoencoderKLTemporalDecoder(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                       layers_per_block=2, latent_channels=4, sample_size=16, scaling_factor=0.5)
  with torch.no_grad():
    for name, parameter in model.named_parameters():
      parameter.add_((1.0 if name.endswith("mix_factor") else 0.05) * torch.randn_like(parameter))
  directory = tmp_path_factory.mktemp("temporal_vae")
  model.save_pretrained(directory, safe_serialization=True)
  return str(directory), model


@pytest.fixture(scope="session")
def causal_vae(tmp_path_factory):
  """(directory, PyTorch model): a tiny random AutoencoderKLHunyuanVideo (HunyuanVideo's causal 3-D VAE; 3 levels:
  4x in space, 4x in time) saved as diffusers does."""
  import torch
  from diffusers import AutoencoderKLHunyuanVideo

  torch.manual_seed(0)
  model = AutoencoderKLHunyuanVideo(block_out_channels=(8, 16, 16), down_block_types=("HunyuanVideoDownBlock3D",) * 3,
                                    up_block_types=("HunyuanVideoUpBlock3D",) * 3, layers_per_block=1,
                                    latent_channels=4, norm_num_groups=4, spatial_compression_ratio=4,
                                    temporal_compression_ratio=4, scaling_factor=0.5)
  return saved_off_its_initialisation(model, tmp_path_factory.mktemp("causal_vae")), model


@pytest.fixture(scope="session")
def wan_vae(tmp_path_factory):
  """(directory, PyTorch model): a tiny random AutoencoderKLWan (Wan 2.1's causal 3-D VAE layout, 8x in
  space and 4x in time, at width 4) saved as diffusers does, with latents normalised per channel."""
  import torch
  from diffusers import AutoencoderKLWan

  torch.manual_seed(0)
  model = AutoencoderKLWan(base_dim=4, z_dim=4, latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[0.5, 2.0, 1.0, 1.5])
  return saved_off_its_initialisation(model, tmp_path_factory.mktemp("wan_vae")), model


@pytest.fixture(scope="session")
def wan22_vae(tmp_path_factory):
  """(directory, PyTorch model): a tiny random AutoencoderKLWan in Wan 2.2 5B's layout (2x2 pixel patches folded
  into channels, residual levels with averaging and duplicating shortcuts, a wider decoder: 16x in space, 4x in
  time) saved as diffusers does."""
  import torch
  from diffusers import AutoencoderKLWan

  torch.manual_seed(0)
  model = AutoencoderKLWan(base_dim=4, decoder_base_dim=8, z_dim=4, is_residual=True, patch_size=2, in_channels=12,
                           out_channels=12, latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[0.5, 2.0, 1.0, 1.5])
  return saved_off_its_initialisation(model, tmp_path_factory.mktemp("wan22_vae")), model


@pytest.fixture(scope="session")
def cogvideox_vae(tmp_path_factory):
  """(directory, PyTorch model): a tiny random AutoencoderKLCogVideoX (CogVideoX's causal 3-D VAE; 3 levels: 4x in
  space, 4x in time) saved as diffusers does."""
  import torch
  from diffusers import AutoencoderKLCogVideoX

  torch.manual_seed(0)
  model = AutoencoderKLCogVideoX(block_out_channels=(8, 16, 16), down_block_types=("CogVideoXDownBlock3D",) * 3,
                                 up_block_types=("CogVideoXUpBlock3D",) * 3, layers_per_block=1, latent_channels=4,
                                 norm_num_groups=4, scaling_factor=0.5)
  return saved_off_its_initialisation(model, tmp_path_factory.mktemp("cogvideox_vae")), model


def as_torch(x):
  import torch

  return torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2)


def test_encoder_and_decoder_compute_what_diffusers_computes(vae):
  import torch

  directory, reference = vae
  ours = autoencoder.load_diffusers(directory)
  x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  z = np.random.default_rng(1).normal(size=(2, 8, 8, 4)).astype(np.float32)
  with torch.no_grad():
    posterior = reference.encode(as_torch(x)).latent_dist
    decoded = reference.decode(as_torch(z)).sample.permute(0, 2, 3, 1).numpy()
  mean, logvar = ours.moments(jnp.asarray(x))
  np.testing.assert_allclose(mean, posterior.mean.permute(0, 2, 3, 1).numpy(), atol=1e-5)
  np.testing.assert_allclose(logvar, posterior.logvar.permute(0, 2, 3, 1).numpy(), atol=1e-5)
  # Latents are shifted and scaled (the diffusion model's input), and decode undoes that first.
  np.testing.assert_allclose(ours.encode(jnp.asarray(x)), (mean - 0.1) * 0.5, atol=1e-6)
  np.testing.assert_allclose(ours.decode((jnp.asarray(z) - 0.1) * 0.5), decoded, atol=1e-5)
  video = jnp.stack([jnp.asarray(x), -jnp.asarray(x)], axis=1)  # frames fold into the batch
  np.testing.assert_allclose(ours.encode(video)[:, 1], ours.encode(-jnp.asarray(x)), atol=1e-6)
  clips = jnp.stack([jnp.asarray(z), -jnp.asarray(z)], axis=1)  # and the image decoder decodes frame by frame
  np.testing.assert_allclose(ours.decode(clips)[:, 1], ours.decode(-jnp.asarray(z)), atol=1e-5)
  draw = ours.encode(jnp.asarray(x), jax.random.key(0))  # a posterior draw: its noise is standard normal
  noise = np.asarray((draw / 0.5 + 0.1 - mean) / jnp.exp(0.5 * logvar))
  assert abs(noise.mean()) < 0.2 and 0.8 < noise.std() < 1.2


def test_temporal_decoder_decodes_clips_as_diffusers_does(temporal_vae):
  """Stable Video Diffusion's VAE: the encoder's posterior per frame, and the decoder's clips (its frames decoded
  together; a still image is a one-frame clip) equal diffusers' AutoencoderKLTemporalDecoder's."""
  import torch

  directory, reference = temporal_vae
  ours = autoencoder.load_diffusers(directory)
  x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  z = np.random.default_rng(1).normal(size=(2, 3, 8, 8, 4)).astype(np.float32)  # 2 clips of 3 frames
  with torch.no_grad():
    posterior = reference.encode(as_torch(x)).latent_dist
    clips = reference.decode(as_torch(z.reshape(6, 8, 8, 4)), num_frames=3).sample
    stills = reference.decode(as_torch(z[:, 0]), num_frames=1).sample
  np.testing.assert_allclose(ours.moments(jnp.asarray(x))[0], posterior.mean.permute(0, 2, 3, 1).numpy(), atol=1e-5)
  np.testing.assert_allclose(ours.decode(jnp.asarray(z) * 0.5),
                             clips.permute(0, 2, 3, 1).numpy().reshape(2, 3, 16, 16, 3), atol=1e-5)
  np.testing.assert_allclose(ours.decode(jnp.asarray(z[:, 0]) * 0.5), stills.permute(0, 2, 3, 1).numpy(), atol=1e-5)
  # Frames are not decoded alone: a clip's first frame is not the still decoded from its latents.
  assert np.abs(ours.decode(jnp.asarray(z) * 0.5)[:, 0] - ours.decode(jnp.asarray(z[:, 0]) * 0.5)).max() > 1e-2


def causal_oracle(ours, reference, side: int, latent_side: int, channels: int, first_frame_alone: bool = False,
                  frames: int = 9):
  """A causal autoencoder against its diffusers PyTorch twin on random clips [2, frames, side, side, 3] and
  random latents [2, 1 + (frames - 1) / 4, latent_side, latent_side, channels]: our posterior (mean and
  log-variance) and the clips we decode from the latents equal the reference's (within 1e-5), and so does a still's
  posterior mean (a one-frame clip); first_frame_alone: the still's is the clip's first latent frame's (Wan's: what
  the image a clip starts at is encoded to is that frame). Returns (clips, latents, our mean, the reference's decoded
  clips and stills)."""
  import torch

  x = np.random.default_rng(0).uniform(-1, 1, (2, frames, side, side, 3)).astype(np.float32)
  z = np.random.default_rng(1).normal(size=(2, 1 + (frames - 1) // 4, latent_side, latent_side, channels))
  z = z.astype(np.float32)
  as_clips = lambda a: torch.from_numpy(a).permute(0, 4, 1, 2, 3)
  channels_last = lambda t: t.permute(0, 2, 3, 4, 1).numpy()
  with torch.no_grad():
    posterior = reference.encode(as_clips(x)).latent_dist
    still_mean = channels_last(reference.encode(as_clips(x[:, :1])).latent_dist.mean)[:, 0]
    clips = channels_last(reference.decode(as_clips(z)).sample)
    stills = channels_last(reference.decode(as_clips(z[:, :1])).sample)
  mean, logvar = ours.moments(jnp.asarray(x))
  np.testing.assert_allclose(mean, channels_last(posterior.mean), atol=1e-5)
  np.testing.assert_allclose(logvar, channels_last(posterior.logvar), atol=1e-5)
  still = ours.moments(jnp.asarray(x[:, 0]))[0]
  np.testing.assert_allclose(still, still_mean, atol=1e-5)
  if first_frame_alone:
    np.testing.assert_allclose(still, mean[:, 0], atol=1e-6)
  assert clips.shape == (2, frames, side, side, 3)
  np.testing.assert_allclose(ours.decode_unscaled(jnp.asarray(z)), clips, atol=2e-5)
  return x, z, mean, clips, stills


def test_causal_autoencoder_compresses_time_as_diffusers_hunyuan_video_vae_does(causal_vae):
  """HunyuanVideo's causal 3-D VAE: a clip of 9 frames has 3 latent frames whose posterior, and the clips decoded
  from latents, equal diffusers' AutoencoderKLHunyuanVideo's; so do a still image's, as a one-frame clip."""
  directory, reference = causal_vae
  ours, config = autoencoder.load_diffusers(directory), autoencoder.read_config(directory)
  assert autoencoder.downsampling_factor(config) == 4 and autoencoder.latent_frames(config, 9) == 3
  _, z, _, clips, stills = causal_oracle(ours, reference, 16, 4, 4)
  np.testing.assert_allclose(ours.decode(jnp.asarray(z) * 0.5), clips, atol=1e-5)  # scaling_factor 0.5
  np.testing.assert_allclose(ours.decode(jnp.asarray(z[:, 0]) * 0.5), stills[:, 0], atol=1e-5)
  # Fine-tuning: one of the same layout starts it; each differing field is named.
  assert autoencoder.start_problems(config, config) == []
  assert autoencoder.start_problems(config, config | {"spatial_compression_ratio": 2}) == [
      "its spatial_compression_ratio is 4, this autoencoder's 2"]


def test_wan_autoencoder_encodes_and_decodes_clips_as_diffusers_does(wan_vae, tmp_path):
  """Wan 2.1's VAE, which diffusers runs in chunks (the first frame, then 4 at a time; one latent frame at a time
  back) with cached frames, as it runs here too: the posterior of 9-frame clips (3 latent frames) and of a still (the
  clip's first latent frame's: a first frame is encoded alone), and the clips decoded from latents (clamped to [-1,
  1]), equal diffusers' AutoencoderKLWan's, and so do the encoder and decoder run on the clip whole; the memory an
  encode or a decode holds grows with the clip by about a copy of its frames (run whole: by more than 4 copies, at
  these tiny widths). Latents are normalised per channel by latents_mean and latents_std. What it cannot build is
  refused with the field to change."""
  directory, reference = wan_vae
  ours, config = autoencoder.load_diffusers(directory), autoencoder.read_config(directory)
  assert autoencoder.downsampling_factor(config) == 8 and autoencoder.time_compression(config) == 4
  assert autoencoder.latent_frames(config, 9) == 3
  assert config["latent_channels"] == 4
  x, z, mean, clips, stills = causal_oracle(ours, reference, 16, 2, 4, first_frame_alone=True)
  # streamed as diffusers runs them, the same functions as the encoder and decoder run on the whole clip
  np.testing.assert_allclose(ours.quant_conv(ours.encoder(jnp.asarray(x)))[..., :4], mean, atol=1e-5)
  np.testing.assert_allclose(ours.decoder(ours.post_quant_conv(jnp.asarray(z))), clips, atol=2e-5)
  temporary = lambda run, shape: jax.jit(run).lower(jnp.zeros(shape)).compile().memory_analysis().temp_size_in_bytes
  growth = lambda run, short, long: temporary(run, long) - temporary(run, short)
  added_frames = 6 * 4 * 32 * 32 * 3 * 4  # bytes of 6 latent frames' frames (24): what a copy of the clip adds
  assert growth(ours.decode_unscaled, (1, 3, 4, 4, 4), (1, 9, 4, 4, 4)) <= 1.5 * added_frames
  assert growth(ours.decoder, (1, 3, 4, 4, 4), (1, 9, 4, 4, 4)) > 4 * added_frames
  assert growth(ours.moments, (1, 9, 32, 32, 3), (1, 33, 32, 32, 3)) <= 1.5 * added_frames
  assert growth(ours.encoder, (1, 9, 32, 32, 3), (1, 33, 32, 32, 3)) > 4 * added_frames
  with pytest.raises(ValueError, match="reads clips of 1 . 4 k frames, not 8: cut or pad them to e.g. 9"):
    ours.encode(jnp.zeros((1, 8, 16, 16, 3)))
  shift, std = np.array([0.1, -0.2, 0.3, 0.0]), np.array([0.5, 2.0, 1.0, 1.5])
  np.testing.assert_allclose(ours.encode(jnp.asarray(x)), (mean - shift) / std, atol=1e-5)
  assert np.abs(clips).max() == 1.0  # some pixels clamped
  # (the normalisation's round trip costs a few float32 roundings)
  np.testing.assert_allclose(ours.decode((jnp.asarray(z) - shift) / std), clips, atol=3e-5)
  np.testing.assert_allclose(ours.decode((jnp.asarray(z[:, 0]) - shift) / std), stills[:, 0], atol=3e-5)
  assert "which this project loads but does not train" in autoencoder.start_problems(config, config)[0]
  from configs import t2v_moving_shapes  # a video model on it diffuses 1 + (frames - 1) / 4 latent frames

  video = t2v_moving_shapes.get_config("test")
  video.latent.autoencoder_path, video.model.in_channels, video.sample.threshold = directory, 4, "none"
  video.data.update(image_fraction=0.0, resolution=32)
  assert "data.frames=4: the causal autoencoder encodes 1 + 4 k frames" in " ".join(
      config_checks.problems(video, device_count=8))
  video.data.frames = 5
  assert config_checks.problems(video, device_count=8) == []
  assert sample.output_shape(video, video.sample) == (2, 4, 4, 4)
  saved = json.loads(open(f"{directory}/config.json").read())
  for change, expected in (({"is_residual": True, "dim_mult": [1, 3, 4, 4]}, "the levels' shortcuts cannot average"),
                           ({"z_dim": 8}, "latents_mean has 4 entries, one per latent channel: z_dim=8"),
                           ({"temperal_downsample": [True, True, True]}, "time must be halved at exactly two"),
                           ({"attn_scales": [0.5]}, "attn_scales .0.5.: diffusers' AutoencoderKLWan cannot run")):
    (tmp_path / "config.json").write_text(json.dumps(saved | change))
    with pytest.raises(ValueError, match=expected):
      autoencoder.read_config(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "latents_std"}))
  with pytest.raises(ValueError, match="latents_std is missing .diffusers would take Wan 2.1's.: give the 4 values"):
    autoencoder.read_config(str(tmp_path))


def test_wan_2_2_autoencoder_folds_pixel_patches_and_adds_shortcuts_as_diffusers_does(wan22_vae, tmp_path):
  """Wan 2.2's 5B VAE: 2x2 pixel patches folded into channels, residual levels whose shortcuts average (encoder) or
  duplicate (decoder) positions and frames, diffusers' first chunk padded or trimmed; posterior (of clips and of a
  still, the clip's first latent frame's) and decoded clips equal diffusers' on 9-frame clips of 32 px (3 x 2 x 2
  latents); a video model on it sees RGB images."""
  from configs import t2v_moving_shapes

  directory, reference = wan22_vae
  ours, config = autoencoder.load_diffusers(directory), autoencoder.read_config(directory)
  assert autoencoder.downsampling_factor(config) == 16 and autoencoder.image_channels(config) == (3, 3)
  causal_oracle(ours, reference, 32, 2, 4, first_frame_alone=True)
  video = t2v_moving_shapes.get_config("test")
  video.latent.autoencoder_path, video.model.in_channels, video.sample.threshold = directory, 4, "none"
  video.data.update(image_fraction=0.0, resolution=32, frames=5)
  video.model.channel_mults = (1,)  # one level for the 2 x 2 latent grid
  video.model.update(num_res_blocks=(1,), attention_levels=(0,))
  assert config_checks.problems(video, device_count=8) == []
  assert sample.output_shape(video, video.sample) == (2, 2, 2, 4)
  saved = json.loads(open(f"{directory}/config.json").read())
  (tmp_path / "config.json").write_text(json.dumps(saved | {"in_channels": 3}))
  with pytest.raises(ValueError, match="in_channels=3 and out_channels=12 count the channels of 2x2 pixel patches"):
    autoencoder.read_config(str(tmp_path))


def test_cogvideox_autoencoder_encodes_and_decodes_clips_in_diffusers_chunks(cogvideox_vae, tmp_path):
  """CogVideoX's VAE, which diffusers runs in chunks (9 frames, then 8 at a time; 3 latent frames, then 2) whose
  group norms see only their chunk: the posterior of 17-frame clips (5 latent frames, two chunks) and of a still,
  and the clips decoded from latents, equal diffusers' AutoencoderKLCogVideoX's; the whole clip run at once does
  not. It decodes an odd number of latent frames only, so a video model on it takes clips of 1 + 8 k frames. What it
  cannot build is refused with the field to change."""
  from configs import t2v_moving_shapes

  directory, reference = cogvideox_vae
  ours, config = autoencoder.load_diffusers(directory), autoencoder.read_config(directory)
  assert autoencoder.downsampling_factor(config) == 4 and autoencoder.time_compression(config) == 4
  x, z, mean, clips, stills = causal_oracle(ours, reference, 16, 4, 4, frames=17)
  np.testing.assert_allclose(ours.decode(jnp.asarray(z) * 0.5), clips, atol=2e-5)  # scaling_factor 0.5
  np.testing.assert_allclose(ours.decode(jnp.asarray(z[:, 0]) * 0.5), stills[:, 0], atol=2e-5)
  assert np.abs(ours.encoder(jnp.asarray(x))[..., :4] - mean).max() > 1e-3  # chunks' group norms, not the clip's
  with pytest.raises(ValueError, match="decodes 2 latent frames to 8 frames, not 5 .* give an odd number"):
    ours.decode_unscaled(jnp.asarray(z[:, :2]))
  video = t2v_moving_shapes.get_config("test")
  video.latent.autoencoder_path, video.model.in_channels, video.sample.threshold = directory, 4, "none"
  video.data.update(image_fraction=0.0, resolution=16, frames=5)
  assert "data.frames=5: the causal autoencoder encodes 1 + 4 k frames into 1 + k latent frames; " \
         "AutoencoderKLCogVideoX decodes an odd number of latent frames only" in " ".join(
             config_checks.problems(video, device_count=8))
  video.data.frames = 9
  assert config_checks.problems(video, device_count=8) == []
  assert sample.output_shape(video, video.sample) == (3, 4, 4, 4)
  assert "which this project loads but does not train" in autoencoder.start_problems(config, config)[0]
  saved = json.loads(open(f"{directory}/config.json").read())
  for change, expected in (({"temporal_compression_ratio": 8}, "temporal_compression_ratio=8: diffusers reads"),
                           ({"use_post_quant_conv": True}, "use_post_quant_conv=true: no CogVideoX checkpoint"),
                           ({"block_out_channels": [8, 16]}, "give at least 3 levels")):
    (tmp_path / "config.json").write_text(json.dumps(saved | change))
    with pytest.raises(ValueError, match=expected):
      autoencoder.read_config(str(tmp_path))


SVD_FIELDS = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=2,
                  norm_num_groups=32, mid_block_add_attention=True, sample_size=16)


def random_autoencoder(fields: dict, seed: int):
  """(diffusers config.json, model, its parameters as a pure dict): our autoencoder of `fields`
  (configs/autoencoder_shapes.py's) with every weight moved off its initial value (biases off zero)."""
  config = autoencoder.diffusers_config(fields, 1.0)
  model = autoencoder.AutoencoderKL(config, rngs=nnx.Rngs(seed))
  state = nnx.state(model, nnx.Param)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda x: np.asarray(x) + 0.1 * rng.normal(size=x.shape).astype(np.float32),
                        nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  return config, model, params


def test_an_image_autoencoder_starts_a_temporal_decoder_that_reconstructs_each_frame_as_it_does():
  """start_params: a temporal decoder started from an image autoencoder (random weights, post_quant_conv's bias
  included) reconstructs clips from their posterior means frame by frame as the image autoencoder does, although
  its temporal layers are running; layouts that cannot start one are refused with the reason."""
  image_config, image, image_params = random_autoencoder(SVD_FIELDS, 1)
  temporal_config, temporal, fresh = random_autoencoder(SVD_FIELDS | {"temporal_decoder": True}, 2)
  assert autoencoder.start_problems(image_config, temporal_config) == []
  state = nnx.state(temporal, nnx.Param)
  nnx.replace_by_pure_dict(state, autoencoder.start_params(image_config, image_params, temporal_config, fresh))
  nnx.update(temporal, state)
  clips = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 16, 3)).astype(np.float32))
  reconstruct = lambda model: model.decode_unscaled(
      model.moments(clips.reshape(6, 16, 16, 3))[0].reshape(2, 3, 8, 8, 4))
  expected = reconstruct(image)
  np.testing.assert_allclose(reconstruct(temporal), expected, atol=1e-4 * float(jnp.abs(expected).max()))
  assert float(jnp.abs(temporal.decoder.mid_block.resnets[0].temporal_res_block.conv1.kernel[...]).max()) > 0

  found = autoencoder.start_problems(image_config | {"block_out_channels": [32, 32]}, temporal_config)
  assert found == ["its block_out_channels is [32, 32], this autoencoder's [32, 64]"]
  one_block = autoencoder.diffusers_config(SVD_FIELDS | {"temporal_decoder": True, "layers_per_block": 1}, 1.0)
  assert "set layers_per_block >= 2" in " ".join(autoencoder.start_problems(
      image_config | {"layers_per_block": 1}, one_block))
  assert autoencoder.start_problems(temporal_config, image_config) == [
      "it has a temporal decoder and this autoencoder an image decoder"]


def test_an_image_autoencoder_inflates_into_a_causal_one_whose_convolutions_read_the_current_frame():
  """start_params, image -> causal ("tail" inflation): every 3-D kernel holds its 2-D kernel at the current frame's
  tap (a downsampling one moved a tap down and right, its far taps folded in) and zeros at the earlier frames', every
  other weight is the image autoencoder's, so a clip of one image repeated starts with the image autoencoder's first
  convolution (its interior); a missing quant convolution starts as the identity; layouts that cannot are
  refused."""
  fields = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
                norm_num_groups=4, mid_block_add_attention=True, sample_size=16)
  image_config, image, image_params = random_autoencoder(fields, 1)
  causal_config, causal, fresh = random_autoencoder(fields | {"causal": True, "spatial_compression_ratio": 4}, 2)
  assert autoencoder.start_problems(image_config, causal_config) == []
  started = autoencoder.start_params(image_config, image_params, causal_config, fresh)
  source, flat = traverse_util.flatten_dict(image_params), traverse_util.flatten_dict(started)
  assert traverse_util.flatten_dict(fresh).keys() == flat.keys()
  kernels = 0
  for path, value in flat.items():
    name = path[:-2] + path[-1:] if path[-2] == "conv" and path[:-2] + path[-1:] in source else path
    if value.ndim == 5:  # [time, h, w, in, out]
      kernels += 1
      assert not value[:-1].any()
      if "downsamplers" in path:  # taps (a, b, c) -> (0, a, b + c) along each spatial axis
        kernel, image_kernel = value[-1], source[name]
        assert not kernel[0].any() and not kernel[:, 0].any()
        np.testing.assert_array_equal(kernel[1, 1], image_kernel[0, 0])
        np.testing.assert_allclose(kernel[2, 2], image_kernel[1:, 1:].sum((0, 1)), atol=1e-6)
        np.testing.assert_allclose(kernel.sum((0, 1)), image_kernel.sum((0, 1)), rtol=1e-5, atol=1e-6)
      else:
        np.testing.assert_array_equal(value[-1], source[name])
    else:
      np.testing.assert_array_equal(value, source[name])
  assert kernels == sum(value.ndim == 4 for value in source.values())  # every 2-D kernel inflated once
  without_quant = {k: v for k, v in image_params.items() if k != "post_quant_conv"}  # use_post_quant_conv=False
  post = autoencoder.start_params(image_config, without_quant, causal_config, fresh)["post_quant_conv"]
  np.testing.assert_array_equal(post["kernel"][-1, 0, 0], np.eye(4))  # the identity, as the image one has none
  assert not post["bias"].any()
  state = nnx.state(causal, nnx.Param)
  nnx.replace_by_pure_dict(state, started)
  nnx.update(causal, state)
  x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  first = causal.encoder.conv_in(jnp.repeat(x[:, None], 5, axis=1))
  for frame in range(5):
    np.testing.assert_allclose(first[:, frame, 1:-1, 1:-1], image.encoder.conv_in(x)[:, 1:-1, 1:-1], atol=1e-5)

  two_x = autoencoder.diffusers_config(fields | {"causal": True, "spatial_compression_ratio": 2}, 1.0)
  assert autoencoder.start_problems(image_config, two_x) == [
      "it halves space at every level but the last (4x), this autoencoder 2x: set spatial_compression_ratio=4, so "
      "that each of its levels resamples space where the image autoencoder's does"]
  assert autoencoder.start_problems(image_config | {"latent_channels": 8}, causal_config) == [
      "its latent_channels is 8, this autoencoder's 4"]
  temporal = autoencoder.diffusers_config(fields | {"temporal_decoder": True}, 1.0)
  assert "it has a temporal decoder" in autoencoder.start_problems(temporal, causal_config)[0]
  assert "a causal autoencoder starts only causal ones" in autoencoder.start_problems(causal_config, image_config)[0]


def test_old_attention_names_load_the_same_weights(vae, tmp_path):
  from safetensors.numpy import load_file, save_file

  directory, _ = vae
  renames = {f"attentions.0.{new}.": f"attentions.0.{old}." for new, old in autoencoder.OLD_ATTENTION_NAMES.items()}
  tensors = {}
  for name, value in load_file(f"{directory}/{autoencoder.WEIGHTS_FILE}").items():
    for new, old in renames.items():
      if new in name:  # and the projections were 1x1 convolutions then
        name, value = name.replace(new, old), value.reshape(value.shape + (1, 1)) if value.ndim == 2 else value
    tensors[name] = value
  assert any(".query." in name for name in tensors)
  save_file(tensors, tmp_path / autoencoder.WEIGHTS_FILE)
  shutil.copy(f"{directory}/config.json", tmp_path / "config.json")
  leaves = lambda model: jax.tree.leaves(nnx.state(model))
  for a, b in zip(leaves(autoencoder.load_diffusers(str(tmp_path))), leaves(autoencoder.load_diffusers(directory))):
    np.testing.assert_array_equal(a, b)


def test_what_it_cannot_read_is_refused_with_a_reason(vae, tmp_path):
  directory, _ = vae
  with pytest.raises(ValueError, match="has no config.json: give the local directory of a diffusers AutoencoderKL"):
    autoencoder.read_config(str(tmp_path))
  shutil.copytree(directory, tmp_path / "pipeline" / "vae")  # a whole checkpoint: its vae/ folder is named
  with pytest.raises(ValueError, match="is a whole pipeline's checkpoint; its autoencoder is its vae/ folder: "
                                       "latent.autoencoder_path='.*pipeline/vae'"):
    autoencoder.read_config(str(tmp_path / "pipeline"))
  config = json.loads(open(f"{directory}/config.json").read())
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="No diffusion_pytorch_model.safetensors"):
    autoencoder.load_diffusers(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps(config | {"layers_per_block": 2}))
  shutil.copy(f"{directory}/{autoencoder.WEIGHTS_FILE}", tmp_path)
  with pytest.raises(ValueError, match="does not match its config.json .*missing decoder.up_blocks.0.resnets.2.conv1"):
    autoencoder.load_diffusers(str(tmp_path))
  other = tmp_path / "temporal"
  other.mkdir()
  (other / "config.json").write_text(json.dumps(config | {"_class_name": "AutoencoderKLLTXVideo"}))
  with pytest.raises(ValueError, match="is not a diffusers AutoencoderKL with 2-D blocks, an AutoencoderKLTemporal"
                                       "Decoder, an AutoencoderKLHunyuanVideo, an AutoencoderKLWan or an "
                                       "AutoencoderKLCogVideoX .class 'AutoencoderKLLTXVideo'"):
    autoencoder.read_config(str(other))
  causal = config | {"_class_name": "AutoencoderKLHunyuanVideo", "temporal_compression_ratio": 8,
                     "down_block_types": ["HunyuanVideoDownBlock3D"] * 2,
                     "up_block_types": ["HunyuanVideoUpBlock3D"] * 2}
  (other / "config.json").write_text(json.dumps(causal))
  with pytest.raises(ValueError, match="temporal_compression_ratio=8: diffusers' decoder of this class supports 4"):
    autoencoder.read_config(str(other))


def latent_config(directory):
  config = t2i_shapes.get_config("test")
  config.latent.autoencoder_path = directory
  config.model.in_channels = 4
  config.sample.threshold = "none"
  return config


def test_the_abstract_model_reads_no_weights_file(vae, tmp_path):
  """Sampling jobs, resumes and inits build the model's shapes first: from config.json files alone (the weights
  of a T5-XXL are 19 GB)."""
  shutil.copytree(vae[0], tmp_path / "vae")
  save_tiny_t5(tmp_path / "t5", "gated-gelu")
  config = latent_config(str(tmp_path / "vae"))
  config.text.update(pretrained_path=str(tmp_path / "t5"), trainable=False)
  weights = text_to_image.pretrained_weights(config)
  (tmp_path / "vae" / autoencoder.WEIGHTS_FILE).unlink()
  (tmp_path / "t5" / "model.safetensors").unlink()
  _, _, frozen = text_to_image.split(text_to_image.abstract(config), config)
  shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
  for name in ("text_encoder", "autoencoder"):
    assert shapes(nnx.to_pure_dict(frozen)[name]) == shapes(weights[name]), name
  with pytest.raises(ValueError, match="No model.safetensors"):
    text_to_image.pretrained_weights(config)


def test_config_check_knows_the_latent_geometry(vae, tmp_path):
  config = latent_config(vae[0])
  assert config_checks.problems(config, device_count=8) == []
  config.model.in_channels = 3
  config.sample.threshold = "static"
  config.data.resolution = 18  # 9x9 latents: too odd for the U-Net's two levels
  message = "; ".join(config_checks.problems(config, device_count=8))
  for expected in ("model.in_channels=3 must equal the autoencoder's latent_channels=4", "would clip latents",
                   "data.resolution=18 must be a multiple of 4 (the autoencoder's downsampling x the U-Net's 2 ** "
                   "(levels - 1), 2 levels)"):
    assert expected in message, message
  config.data.resolution = 17
  assert "data.resolution=17 must be a multiple of 4" in "; ".join(
      config_checks.problems(config, device_count=8))
  config.latent.autoencoder_path = str(tmp_path)
  assert "has no config.json" in "; ".join(config_checks.problems(config, device_count=8))
  config.latent.autoencoder_path, config.model.in_channels = "", 4
  assert "model.in_channels=4 must be 3 for a pixel model" in "; ".join(config_checks.problems(config, device_count=8))


def test_latent_model_trains_on_a_pod_mesh_and_samples_images(vae, tmp_path):
  config = latent_config(vae[0])
  config.data.data_dir = str(tmp_path)
  save_tiny_t5(tmp_path / "t5", "gated-gelu")  # a pretrained, frozen text encoder too
  config.text.update(pretrained_path=str(tmp_path / "t5"), trainable=False)
  batch_np = {k: v for k, v in pipeline.synthetic_batch(config).items() if k in ("image", "text_ids", "text_mask")}
  batch_np["image"] = np.random.default_rng(0).uniform(-1, 1, batch_np["image"].shape).astype(np.float32)
  # The network takes 4-channel 8x8 latents: fed the images, the step would not compile.
  state, metrics = one_step(config, dict(data=2, fsdp=2, tensor=2), batch_np)
  assert np.isfinite(metrics["loss"]) and int(state.step) == 1
  for name, weights in text_to_image.pretrained_weights(config).items():  # frozen, and left as loaded
    assert name not in state.params
    for a, b in zip(jax.tree.leaves(jax.device_get(state.frozen[name])), jax.tree.leaves(weights)):
      np.testing.assert_array_equal(a, b)
  graphdef = text_to_image.split(text_to_image.abstract(config), config)[0]
  sample_config = config.sample.copy_and_resolve_references()
  sample_config.update(steps=2, num_per_prompt=2)
  images = sample.generate(config, graphdef, state.params, state.frozen, tokenizers.from_config(config),
                           ["a large red circle"], sample_config, sharding.make_mesh(config.mesh))
  assert images.shape == (1, 2, 16, 16, 3) and images.dtype == np.uint8
  keep = np.zeros((1, 16, 16), bool)
  keep[:, :, 9:] = True  # latent columns 5-7 kept (factor 2); the one holding pixels 8 and 9 generated anew
  inpainted = sample.generate(config, graphdef, state.params, state.frozen, tokenizers.from_config(config),
                              ["a large red circle"], sample_config, sharding.make_mesh(config.mesh),
                              init_images=images[:, 0], keep_masks=keep)
  for edited in inpainted[0]:  # both samples of the prompt: the kept pixels as given, the others generated
    np.testing.assert_array_equal(edited[keep[0]], images[0, 0][keep[0]])
    assert np.abs(edited[~keep[0]].astype(int) - images[0, 0][~keep[0]]).max() > 0


def test_latent_cache_holds_the_encoders_posteriors_and_trains_like_the_pixels(vae, tmp_path):
  """latent.cache of a latent super-resolution stage (16 px latents, 8 px input): each row is the autoencoder's
  posterior of that record's pixels and the stage's clean low-res input (float16), a loader batch from the cache
  is the same examples as one from the pixels and gives the train step the same loss, and a cache of another
  dataset or input size is refused, as is a cache with random flips."""
  config = latent_config(vae[0])
  config.model.lowres_conditioning = True
  config.superres.lowres_resolution = 8
  config.data.data_dir = str(tmp_path / "tfds")
  config.latent.cache = str(tmp_path / "cache")
  config.mesh.update(data=1)  # one device: compiling for it is faster than for eight (the pod mesh is tested above)
  one_device = jax.devices()[:1]
  state, graphdef = train.init_state(config, sharding.make_mesh(config.mesh, one_device))
  source = pipeline.data_source(config.data, "train")
  cache = train.open_latent_cache(config, graphdef, state, source)
  preprocess = pipeline.Preprocess(config.data, None)
  pixels = np.stack([preprocess.pixels(source[i], np.random.default_rng(0))["image"] for i in (0, 77)])
  mean, logvar = autoencoder.load_diffusers(vae[0]).moments(jnp.asarray(pixels))
  lowres = superres.lowres_input(jnp.asarray(pixels), config)
  for row, index in enumerate((0, 77)):
    cached = cache(index)
    assert cached.keys() == {"latent_mean", "latent_logvar", "lowres"} and set(cached) <= set(pipeline.MODEL_INPUTS)
    np.testing.assert_allclose(cached["latent_mean"], mean[row], rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(cached["latent_logvar"], logvar[row], rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(cached["lowres"], lowres[row], atol=2e-3)
    assert cached["lowres"].shape == (8, 8, 3)

  tokenizer = tokenizers.from_config(config)
  loader = lambda **cached: next(iter(pipeline.make_loader(config.data, source, tokenizer, 16, seed=0, **cached)))
  cached, plain = loader(latent_cache=cache), loader()
  np.testing.assert_array_equal(cached[pipeline.RECORD_INDEX], plain[pipeline.RECORD_INDEX])
  inputs = lambda batch, keys: {k: batch[k] for k in keys + ("text_ids", "text_mask")}
  _, from_cache = one_step(config, {}, inputs(cached, ("latent_mean", "latent_logvar", "lowres")), one_device)
  _, from_pixels = one_step(config, {}, inputs(plain, ("image",)), one_device)
  np.testing.assert_allclose(from_cache["loss"], from_pixels["loss"], rtol=1e-2)

  for field, value in (("data.num_train", 128), ("superres.lowres_resolution", 4)):  # the key no longer matches
    other = config.copy_and_resolve_references()
    other.update_from_flattened_dict({field: value})
    with pytest.raises(ValueError, match="built for another autoencoder or dataset"):
      train.open_latent_cache(other, graphdef, state, source)
  other.data.random_flip = True
  assert "latent.cache holds one view of each example, but data.random_flip" in "; ".join(
      config_checks.problems(other, device_count=8))


def test_video_latent_model_caches_each_frames_posterior_and_samples_clips_through_a_temporal_decoder(
    temporal_vae, tmp_path):
  """A video model on Stable Video Diffusion's VAE: the latent cache holds each frame's posterior, the frozen
  weights are the temporal decoder's as loaded, and sampled clips are decoded clip by clip."""
  from configs import t2v_moving_shapes

  config = t2v_moving_shapes.get_config("test")
  config.update(latent=dict(autoencoder_path=temporal_vae[0], cache=str(tmp_path / "cache")))
  config.model.in_channels = 4
  config.sample.threshold = "none"
  config.data.update(data_dir=str(tmp_path / "tfds"), image_fraction=0.0)  # a cache holds one view of each clip
  assert not config_checks.problems(config, device_count=8)
  state, graphdef = train.init_state(config, sharding.make_mesh(config.mesh))
  source = pipeline.data_source(config.data, "train")
  cache = train.open_latent_cache(config, graphdef, state, source)
  slower = config.copy_and_resolve_references()
  slower.data.travel = 0.3  # other clips: the key no longer matches
  with pytest.raises(ValueError, match="built for another autoencoder or dataset"):
    train.open_latent_cache(slower, graphdef, state, source)
  key = lambda data: latent_cache.cache_key(state.frozen["autoencoder"], data)
  later = ("travel", "wrap_around", "frame_stride", "eval_captions_file", "width")  # data fields added later
  earlier = {k: v for k, v in config.data.items() if k not in later}
  assert key(ml_collections.ConfigDict(earlier)) == key(config.data)  # caches built before them still open
  strided = config.data.copy_and_resolve_references()
  strided.frame_stride = 2  # a folder of clips read at every other frame: other pixels, another key
  wide = config.data.copy_and_resolve_references()
  wide.width = 32  # non-square clips: another key
  assert key(strided) != key(config.data) and key(wide) != key(config.data)
  clip = pipeline.Preprocess(config.data, None).pixels(source[5], np.random.default_rng(0))["video"]
  loaded = autoencoder.load_diffusers(temporal_vae[0])
  mean, logvar = loaded.moments(jnp.asarray(clip))  # the frames as a batch
  assert cache(5).keys() == {"latent_mean", "latent_logvar"}  # no low-res input for a base model
  assert cache(5)["latent_mean"].shape == (config.data.frames, 8, 8, 4)
  np.testing.assert_allclose(cache(5)["latent_mean"], mean, rtol=2e-3, atol=2e-3)
  np.testing.assert_allclose(cache(5)["latent_logvar"], logvar, rtol=2e-3, atol=2e-3)
  batch = next(iter(pipeline.make_loader(config.data, source, tokenizers.from_config(config), 4, seed=0,
                                         latent_cache=cache)))
  assert batch["latent_mean"].shape == (4, config.data.frames, 8, 8, 4) and batch["is_video"].all()

  frozen = jax.device_get(state.frozen["autoencoder"])
  assert "time_conv_out" in frozen["decoder"]
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(text_to_image.pretrained_weights(config)["autoencoder"])):
    np.testing.assert_array_equal(a, b)
  sample_config = config.sample.copy_and_resolve_references()
  sample_config.update(steps=2, num_per_prompt=1)
  clips = sample.generate(config, graphdef, state.params, state.frozen, tokenizers.from_config(config),
                          ["a red circle moving left"], sample_config, sharding.make_mesh(config.mesh))
  assert clips.shape == (1, 1, config.data.frames, 16, 16, 3) and clips.dtype == np.uint8


def test_video_latent_model_on_a_causal_autoencoder_diffuses_fewer_frames_than_it_samples(causal_vae, tmp_path):
  """A video model on HunyuanVideo's causal VAE: clips of 5 frames (4 is refused), 2 latent frames a clip in the
  latent cache (each clip's posterior) and in the network, which trains a step on them, 5-frame clips sampled, and
  image-to-video keeps the given first frame (the first latent frame), and extension to 9 frames keeps the last
  frame (a latent frame) and adds 4."""
  from configs import t2v_moving_shapes

  config = t2v_moving_shapes.get_config("test")
  config.update(latent=dict(autoencoder_path=causal_vae[0], cache=str(tmp_path / "cache")))
  config.model.in_channels = 4
  config.sample.threshold = "none"
  config.data.update(data_dir=str(tmp_path / "tfds"), image_fraction=0.0)
  found = " ".join(config_checks.problems(config, device_count=8))
  assert "data.frames=4: the causal autoencoder encodes 1 + 4 k frames" in found and "e.g. 5" in found
  config.data.frames = 5
  assert not config_checks.problems(config, device_count=8)
  state, graphdef = train.init_state(config, sharding.make_mesh(config.mesh))
  source = pipeline.data_source(config.data, "train")
  cache = train.open_latent_cache(config, graphdef, state, source)
  clip = pipeline.Preprocess(config.data, None).pixels(source[5], np.random.default_rng(0))["video"]
  mean, _ = autoencoder.load_diffusers(causal_vae[0]).moments(jnp.asarray(clip)[None])
  assert cache(5)["latent_mean"].shape == (2, 4, 4, 4)
  np.testing.assert_allclose(cache(5)["latent_mean"], mean[0], rtol=2e-3, atol=2e-3)
  batch = next(iter(pipeline.make_loader(config.data, source, tokenizers.from_config(config), 8, seed=0,
                                         latent_cache=cache)))
  keys = ("latent_mean", "latent_logvar", "text_ids", "text_mask")
  _, metrics = one_step(config, {}, {k: batch[k] for k in keys})  # the network diffuses 2 latent frames
  assert np.isfinite(metrics["loss"])
  sample_config = config.sample.copy_and_resolve_references()
  sample_config.update(steps=2, num_per_prompt=1, strength=1.0)  # as extension windows are: one compiled sampler
  assert sample.output_shape(config, sample_config) == (2, 4, 4, 4)
  first = (np.asarray(clip[0]) * 127.5 + 127.5).round().astype(np.uint8)
  given, keep = edit_inputs.first_frame_edit(first, 5)
  prompts, mesh = ["a red circle moving left"], sharding.make_mesh(config.mesh)
  clips = sample.generate(config, graphdef, state.params, state.frozen, tokenizers.from_config(config), prompts,
                          sample_config, mesh, init_images=given[None], keep_masks=keep[None])
  assert clips.shape == (1, 1, 5, 16, 16, 3) and clips.dtype == np.uint8
  np.testing.assert_array_equal(clips[0, 0, 0], first)
  # Extension keeps whole latent frames: 1 + 4 k frames of context (by default 1 of a 5-frame clip), 4 new a window.
  longer = sample_config.copy_and_resolve_references()
  longer.update(video_length=9, context_frames=2)
  assert "--context_frames=2: a window keeps whole latent frames" in " ".join(sample.extension_problems(config, longer))
  longer.context_frames = 0
  assert not sample.extension_problems(config, longer) and sample.extension_context(config, longer) == 1
  videos = sample.extended(config, graphdef, state.params, state.frozen, tokenizers.from_config(config), prompts,
                           longer, mesh, [longer.seed], [""], clips)
  assert videos.shape == (1, 1, 9, 16, 16, 3)
  np.testing.assert_array_equal(videos[:, :, :5], clips)


def test_latent_super_resolution_stage_reads_the_low_res_image(vae):
  """A latent super-resolution stage (as Stable Diffusion's x4 upscaler) diffuses the 8x8x4 latents of 16 px
  images and reads the 8 px RGB image resized to its latent grid: a train step teaches its first convolution's
  low-res channels, its held-out loss and sampler take the image, a DiT stage's output depends on it too, and the
  residual option is refused for it."""
  config = latent_config(vae[0])
  config.model.lowres_conditioning = True
  config.superres.lowres_resolution = 8
  config.mesh.update(data=1)
  assert config_checks.problems(config, device_count=1) == []
  one_device = jax.devices()[:1]
  mesh = sharding.make_mesh(config.mesh, one_device)
  batch_np = {k: v for k, v in pipeline.synthetic_batch(config).items() if k in ("image", "text_ids", "text_mask")}
  batch_np["image"] = np.random.default_rng(0).uniform(-1, 1, batch_np["image"].shape).astype(np.float32)
  graphdef = train.abstract_state(config, mesh)[1]
  state, metrics = one_step(config, {}, batch_np, one_device)  # the step makes the low-res input from the pixels
  assert np.isfinite(metrics["loss"]) and state.params["unet"]["conv_in"]["kernel"].shape[2] == 4 + 3

  def network(lowres):  # every weight moved off its initial value (the output layer starts at zero)
    model = nnx.merge(graphdef, jax.tree.map(lambda p: p + 0.05, state.params), state.frozen)
    text = model.encode(batch_np["text_ids"][:2], batch_np["text_mask"][:2])
    return model(jnp.zeros((2, 8, 8, 4)), jnp.zeros(2), text, batch_np["text_mask"][:2], lowres=lowres,
                 aug_logsnr=jnp.zeros(2))

  lowres = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3), minval=-1, maxval=1)
  assert np.abs(jax.jit(network)(lowres) - jax.jit(network)(-lowres)).max() > 1e-6
  losses = heldout_loss.make_heldout_loss_fn(config, graphdef)(state.params, state.frozen, batch_np)
  assert np.isfinite(losses).all()
  sample_config = config.sample.copy_and_resolve_references()
  sample_config.update(steps=2, num_per_prompt=1)
  lowres = np.random.default_rng(1).integers(0, 256, (2, 1, 8, 8, 3), np.uint8)
  images = sample.generate(config, graphdef, state.params, state.frozen, tokenizers.from_config(config),
                           ["a large red circle"] * 2, sample_config, mesh, lowres=lowres)
  assert images.shape == (2, 1, 16, 16, 3) and images.dtype == np.uint8

  dit = config.copy_and_resolve_references()  # a latent DiT stage reads it too, patchified with the latents
  dit.model.update(backbone="dit", channels=16, depth=2, patch_size=2)
  assert config_checks.problems(dit, device_count=1) == []
  state, graphdef = train.init_state(dit, mesh)  # network() above reads these
  assert state.params["dit"]["patch_in"]["kernel"].shape[0] == 2 * 2 * (4 + 3)
  lowres = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3), minval=-1, maxval=1)
  assert np.abs(jax.jit(network)(lowres) - jax.jit(network)(-lowres)).max() > 1e-6

  config.superres.update(residual=True)
  assert "turn superres.residual off" in "; ".join(config_checks.problems(config, device_count=1))
