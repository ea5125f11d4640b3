"""Writing generated images and videos that carry their provenance (PNG, GIF, MP4), and labelled grids; reading
given images upright."""

import fractions
import json
import pathlib

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageOps
import PIL.PngImagePlugin


def to_uint8(images) -> np.ndarray:
  """[..., h, w, 3] in [-1, 1] -> uint8 [0, 255] (NaN: 0, black)."""
  return np.clip(np.round((np.nan_to_num(np.asarray(images, np.float32), nan=-1.0) + 1) * 127.5), 0, 255
                 ).astype(np.uint8)


def to_float(images) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1] (the inverse of to_uint8 up to rounding)."""
  return np.asarray(images, np.float32) / 127.5 - 1.0


def save_png(path, image: np.ndarray, provenance: dict) -> None:
  """Save uint8 [h, w, 3]; every provenance key becomes a PNG text chunk (plus 'generated_by')."""
  info = PIL.PngImagePlugin.PngInfo()
  info.add_text("generated_by", "diffusion_jax")
  for key, value in provenance.items():
    info.add_text(key, value if isinstance(value, str) else json.dumps(value))
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  PIL.Image.fromarray(image).save(path, pnginfo=info)


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")  # PIL's modes of a 16-bit grayscale PNG


WHITE, BLACK = (255, 255, 255), (0, 0, 0)


class FloatPixels(ValueError):
  """An image of 32-bit float pixels (PIL's mode F: a float TIFF), whose range (0..1, 0..255, HDR) no file states."""


def upright_rgb(image: PIL.Image.Image, background: tuple[int, int, int] = WHITE) -> PIL.Image.Image:
  """An opened image as RGB, turned as its EXIF orientation says: a camera's photo is often stored sideways with a
  tag saying how to turn it (diffusers' load_image turns it too). A 16-bit grayscale image is scaled to 8 bits
  (PIL's convert would clip its 0..65535 at 255: white wherever it is above 0.4% grey). An image with transparency
  (an alpha channel, a palette's or a colour's) is laid over `background`, white as LAION's img2dataset lays it
  (PIL's convert drops the alpha, showing whatever colour its transparent pixels store: often black). Float pixels
  raise FloatPixels (PIL's convert clips them at 0..255: a 0..1 image black)."""
  if image.mode == "F":
    raise FloatPixels("32-bit float pixels, whose range no file states (PIL's conversion would clip them: 0..1 "
                      "black): save the image with 8 or 16 bits a channel")
  image = PIL.ImageOps.exif_transpose(image)
  if image.mode in SIXTEEN_BIT_MODES:
    image = PIL.Image.fromarray(np.clip(np.round(np.asarray(image, np.float64) / 257), 0, 255).astype(np.uint8))
  if image.has_transparency_data:
    image = PIL.Image.alpha_composite(PIL.Image.new("RGBA", image.size, background + (255,)), image.convert("RGBA"))
  return image.convert("RGB")


def upright_frame(frame, background: tuple[int, int, int] = WHITE) -> PIL.Image.Image:
  """A decoded video frame (PyAV's) as an RGB image, turned as its display matrix says: a phone's clip is often stored
  sideways with a matrix saying how to turn it (players and FFmpeg turn it). A frame with an alpha channel (a .mov's
  PNG, QuickTime Animation or ProRes 4444) is laid over `background` as upright_rgb lays an image (FFmpeg's RGB
  shows whatever colour its transparent pixels store: black here)."""
  if any(component.is_alpha for component in frame.format.components):
    image = upright_rgb(PIL.Image.fromarray(frame.to_ndarray(format="rgba")), background)
  else:
    image = frame.to_image()
  return image.rotate(frame.rotation, expand=True) if frame.rotation else image  # (counterclockwise, as PIL turns)


def read_image(path, background: tuple[int, int, int] = WHITE) -> np.ndarray:
  """uint8 [h, w, 3] of an image file, upright, its transparent pixels `background`."""
  with PIL.Image.open(path) as image:
    return np.asarray(upright_rgb(image, background))


def read_provenance(path) -> dict:
  with PIL.Image.open(path) as image:
    return dict(image.text)


def labelled_grid(rows: list[np.ndarray], labels: list[str], scale: int = 2, label_height: int = 14) -> np.ndarray:
  """rows: one uint8 [n, h, w, 3] per label -> one image with each label above its row."""
  n = max(len(r) for r in rows)
  h, w = rows[0].shape[1] * scale, rows[0].shape[2] * scale
  width = max(n * (w + 2), 8 * max(len(label) for label in labels) // 1)
  canvas = PIL.Image.new("RGB", (width, len(rows) * (h + label_height + 4)), (255, 255, 255))
  draw = PIL.ImageDraw.Draw(canvas)
  for r, (row, label) in enumerate(zip(rows, labels)):
    top = r * (h + label_height + 4)
    draw.text((2, top), label, fill=(0, 0, 0))
    for c, image in enumerate(row):
      tile = PIL.Image.fromarray(image).resize((w, h), PIL.Image.NEAREST)
      canvas.paste(tile, (c * (w + 2), top + label_height))
  return np.asarray(canvas)


def save_gif(path, frames: np.ndarray, provenance: dict, scale: int = 1, fps: float = 4.0) -> None:
  """Animated GIF of uint8 [frames, h, w, 3], looping, upscaled by `scale` (nearest); the provenance (plus
  'generated_by') is stored as JSON in the GIF comment."""
  record = {"generated_by": "diffusion_jax", **provenance}
  images = [PIL.Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), PIL.Image.NEAREST)
            for f in frames]
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0,
                 comment=json.dumps(record).encode())


def read_gif(path) -> tuple[np.ndarray, dict]:
  """(frames uint8 [frames, h, w, 3], provenance) of a GIF (one written by save_gif, or a user's: its transparent
  pixels white, as upright_rgb reads them)."""
  with PIL.Image.open(path) as image:
    frames = []
    for index in range(image.n_frames):
      image.seek(index)
      frames.append(np.asarray(upright_rgb(image)))
    return np.stack(frames), json.loads(image.info.get("comment", b"{}"))


def save_mp4(path, frames: np.ndarray, provenance: dict, scale: int | None = None, fps: float = 4.0) -> None:
  """H.264 MP4 (yuv420p, high quality: CRF 12) of uint8 [frames, h, w, 3]; the provenance (plus 'generated_by') is
  JSON in the container's comment tag. Frames are upscaled by `scale` (nearest; default: the smallest
  factor giving a shorter side of at least 128 px, as 4:2:0 chroma would smear a tiny clip's colours) and
  padded with black to even sides, which the codec needs."""
  import av  # PyAV: FFmpeg's encoders as a wheel

  scale = scale or -(-128 // min(frames.shape[1:3]))
  frames = np.repeat(np.repeat(np.asarray(frames, np.uint8), scale, axis=1), scale, axis=2)
  frames = np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)))
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  with av.open(str(path), "w") as container:
    container.metadata["comment"] = json.dumps({"generated_by": "diffusion_jax", **provenance})
    stream = container.add_stream("libx264", rate=fractions.Fraction(fps).limit_denominator(1000))
    stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
    stream.options = {"crf": "12"}
    for frame in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode())


def read_mp4(path) -> tuple[np.ndarray, dict]:
  """(frames uint8 [frames, h, w, 3] as stored, i.e. upscaled and padded, provenance) of a save_mp4 file; another
  MP4's frames upright (upright_frame)."""
  import av

  with av.open(str(path)) as container:
    frames = np.stack([np.asarray(upright_frame(frame)) for frame in container.decode(video=0)])
    return frames, json.loads(container.metadata.get("comment", "{}"))
