"""Tokenizers: caption strings -> (ids [n, max_length] int32, mask [n, max_length] bool).

`WordTokenizer` covers closed vocabularies (the built-in datasets); `SentencePieceTokenizer` loads a
sentencepiece model from a local path (T5's `spiece.model`); `CLIPTokenizer` CLIP's byte-level BPE from a local
directory (Stable Diffusion's `tokenizer/`); `CLIPTokenizerPair` SDXL's two and `CLIPAndT5Tokenizers` SD3's and
Flux's CLIP and T5 ones side by side. All pad to max_length and truncate an over-long prompt with a warning; an empty
prompt gives a row whose mask is all False (CLIP's ids still encode it: start and end of text), but for the T5 part
of SD3's and Flux's, which holds and marks its end-of-sequence, as their pipelines encode it.
"""

import logging
import pathlib
import re

import numpy as np

from diffusion_jax import local_files

PAD_ID = 0


def _pack(token_lists, max_length, texts, keep_last=False):
  """keep_last: an over-long prompt keeps its last token (an end-of-sequence) after the first max_length - 1."""
  ids = np.zeros((len(token_lists), max_length), np.int32)
  for row, (tokens, text) in enumerate(zip(token_lists, texts)):
    if len(tokens) > max_length:
      shown = text if len(text) <= 80 else text[:77] + "..."
      logging.warning("Prompt has %d tokens, truncated to max_length=%d: %r", len(tokens), max_length, shown)
      tokens = tokens[:max_length - 1] + tokens[-1:] if keep_last else tokens[:max_length]
    ids[row, :len(tokens)] = tokens
  return ids, ids != PAD_ID


class WordTokenizer:
  """Lower-cased words of a fixed vocabulary; id 0 = padding, 1 = unknown word (each such word warned of once: a
  prompt's "crimson" is read as no colour at all)."""

  def __init__(self, vocabulary, max_length: int):
    self.vocabulary = tuple(vocabulary)
    self.max_length = max_length
    self._ids = {word: i + 2 for i, word in enumerate(self.vocabulary)}
    self._unknown_seen = set()

  @property
  def vocab_size(self) -> int:
    return len(self.vocabulary) + 2

  def __call__(self, texts):
    texts = [t.decode() if isinstance(t, bytes) else t for t in texts]
    words = [re.findall(r"[a-z0-9]+", t.lower()) for t in texts]
    if unknown := sorted({w for ws in words for w in ws if w not in self._ids} - self._unknown_seen):
      self._unknown_seen.update(unknown)
      logging.warning("Words outside the tokenizer's %d-word vocabulary, each read as one unknown token: %s",
                      len(self.vocabulary), ", ".join(unknown[:20]) + (" ..." if len(unknown) > 20 else ""))
    return _pack([[self._ids.get(w, 1) for w in ws] for ws in words], self.max_length, texts)


class SentencePieceTokenizer:
  """A sentencepiece model from a local file, with an end-of-sequence token appended (as T5 does; kept when a long
  prompt is cut, as transformers' T5 tokenizer keeps it); to the empty prompt too with end_empty (transformers' T5
  tokenizer, as SD3's and Flux's pipelines call it), else the empty prompt gives no ids."""

  def __init__(self, model_path: str, max_length: int, end_empty: bool = False):
    import sentencepiece

    if not pathlib.Path(model_path).is_file():  # (sentencepiece reads '' as an empty model)
      raise ValueError(f"Cannot load a sentencepiece model from {str(model_path)!r}: no such file; give the path of a "
                       "local spiece.model file (text.spiece_path).")
    try:
      self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
    except (OSError, RuntimeError) as error:
      raise local_files.unreadable(model_path, "a sentencepiece model (text.spiece_path: a local spiece.model)",
                                     error) from None
    if self._sp.pad_id() != PAD_ID:
      raise ValueError(f"sentencepiece model {model_path!r} has pad id {self._sp.pad_id()}, expected {PAD_ID} "
                       "(T5 convention).")
    self.max_length, self.end_empty = max_length, end_empty

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def __call__(self, texts):
    texts = [t.decode() if isinstance(t, bytes) else t for t in texts]
    token_lists = [self._sp.encode(t) + [self._sp.eos_id()] if t or self.end_empty else [] for t in texts]
    return _pack(token_lists, self.max_length, texts, keep_last=True)


class CLIPTokenizer:
  """CLIP's byte-level BPE (transformers' CLIPTokenizer, as Stable Diffusion's pipelines call it: start-of-text, the
  prompt's tokens, end-of-text, cut to max_length with the end kept last, then the pad token) from a local directory:
  its tokenizer.json, else vocab.json and merges.txt (SD's tokenizer/ folder), the pad token from
  tokenizer_config.json or special_tokens_map.json (SD 1.x: end-of-text; SD 2.x: "!"). The mask marks the prompt's
  tokens, start and end included (all False for an empty prompt)."""

  START, END = "<|startoftext|>", "<|endoftext|>"
  SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""  # CLIP's words, numbers, punctuation

  def __init__(self, path: str, max_length: int, field: str = "text.tokenizer_path"):
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

    directory = pathlib.Path(path).expanduser()
    if (directory / "tokenizer.json").is_file():
      try:
        self._tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
      except Exception as error:  # (tokenizers raises Exception itself)
        raise local_files.unreadable(directory / "tokenizer.json", f"a tokenizer ({field})", error) from None
    elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
      self._tok = Tokenizer(models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt"),
                                                 unk_token=self.END, end_of_word_suffix="</w>",
                                                 continuing_subword_prefix="", fuse_unk=False))
      self._tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                                   normalizers.Lowercase()])
      self._tok.pre_tokenizer = pre_tokenizers.Sequence([
          pre_tokenizers.Split(Regex(self.SPLIT), behavior="removed", invert=True),
          pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
      raise ValueError(f"{field}={str(path)!r} has no tokenizer.json, nor vocab.json and merges.txt: give the local "
                       "directory of a CLIP tokenizer (the tokenizer/ folder of a Stable Diffusion checkpoint)")
    settings = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
      settings |= local_files.read_json(directory / name) if (directory / name).is_file() else {}
    pad = settings.get("pad_token", self.END)
    pad = pad.get("content") if isinstance(pad, dict) else pad
    special = (self.START, self.END, pad)
    if missing := [token for token in special if self._tok.token_to_id(token) is None]:
      raise ValueError(f"{field}={str(path)!r} lacks {missing}: is it a CLIP tokenizer?")
    self._tok.add_special_tokens(list(special))  # split out of a prompt before BPE, as transformers does
    self.start_id, self.end_id, self.pad_id = (self._tok.token_to_id(token) for token in special)
    self.max_length = max_length

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size()

  def __call__(self, texts):
    texts = [t.decode() if isinstance(t, bytes) else t for t in texts]
    ids = np.full((len(texts), self.max_length), self.pad_id, np.int32)
    mask = np.zeros((len(texts), self.max_length), bool)
    for row, (text, encoding) in enumerate(zip(texts, self._tok.encode_batch(texts, add_special_tokens=False))):
      words = [i for i in encoding.ids if i not in (self.start_id, self.end_id)]
      if len(words) > self.max_length - 2:
        logging.warning("Prompt has %d tokens, truncated to max_length=%d: %r", len(words) + 2, self.max_length, text)
      tokens = [self.start_id] + words[:self.max_length - 2] + [self.end_id]
      ids[row, :len(tokens)] = tokens
      mask[row, :len(tokens)] = bool(text)
    return ids, mask


class CLIPTokenizerPair:
  """SDXL's two CLIP tokenizers (tokenizer/ and tokenizer_2/, whose padding differs: end-of-text and "!"): ids
  [n, 2 max_length], the first's then the second's (what models/sdxl_text.py's TextEncoders split), and the first's
  mask [n, max_length]."""

  def __init__(self, first_path: str, second_path: str, max_length: int):
    self.first = CLIPTokenizer(first_path, max_length)
    self.second = CLIPTokenizer(second_path, max_length, "text.second_tokenizer_path")

  def __call__(self, texts):
    (first, mask), (second, _) = self.first(texts), self.second(texts)
    return np.concatenate([first, second], axis=1), mask


class CLIPAndT5Tokenizers:
  """Stable Diffusion 3's and Flux's tokenizers: one or two CLIP tokenizers (SD3's pair as CLIPTokenizerPair's, Flux's
  one) and T5's (sentencepiece, end-of-sequence appended, the empty prompt's too, as transformers' T5 tokenizer;
  zeros without a T5: spiece_path empty): ids [n, clips x max_length + t5_max_length], the CLIP tokenizers' then
  T5's, and the mask of the tokens the transformer attends to (what models/sd3_text.py's and flux_text.py's
  TextEncoders make): the first CLIP's then T5's [n, max_length + t5_max_length] (SD3's) or, `t5_only`, T5's
  [n, t5_max_length] (Flux's)."""

  def __init__(self, clip_paths, spiece_path: str, max_length: int, t5_max_length: int, t5_only: bool = False):
    self.clip = (CLIPTokenizerPair(*clip_paths, max_length) if len(clip_paths) == 2 else
                 CLIPTokenizer(clip_paths[0], max_length))
    self.t5 = SentencePieceTokenizer(spiece_path, t5_max_length, end_empty=True) if spiece_path else None
    self.t5_max_length, self.t5_only = t5_max_length, t5_only

  def __call__(self, texts):
    texts = [t.decode() if isinstance(t, bytes) else t for t in texts]
    ids, mask = self.clip(texts)
    if self.t5 is None:
      t5_ids = np.zeros((len(texts), self.t5_max_length), np.int32)
    else:
      t5_ids, _ = self.t5(texts)
    t5_mask = t5_ids != PAD_ID
    return np.concatenate([ids, t5_ids], axis=1), t5_mask if self.t5_only else np.concatenate([mask, t5_mask], 1)


def ids_per_prompt(config) -> int:
  """How many token ids a prompt's text_ids hold: text.max_length, twice that for SDXL's pair of tokenizers, and
  text.t5_max_length more for SD3's and Flux's T5."""
  pair = config.text.max_length * (2 if config.text.second_tokenizer_path else 1)
  return pair + (config.text.t5_max_length if config.model.backbone in ("sd3", "flux") else 0)


def train_sentencepiece(captions, model_prefix, vocab_size: int = 64) -> str:
  """Train a small sentencepiece model on captions (T5 ids: pad 0, eos 1, unk 2); returns the model path."""
  import io

  import sentencepiece

  text = "\n".join(c.decode() if isinstance(c, bytes) else c for c in captions)
  sentencepiece.SentencePieceTrainer.train(sentence_iterator=io.StringIO(text), model_prefix=str(model_prefix),
                                           vocab_size=vocab_size, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                           hard_vocab_limit=False)
  return f"{model_prefix}.model"


def from_config(config):
  """The tokenizer named by config.text for the dataset of config.data."""
  if config.text.tokenizer == "sentencepiece":
    return SentencePieceTokenizer(config.text.spiece_path, config.text.max_length)
  if config.text.tokenizer == "clip" and config.model.backbone in ("sd3", "flux"):
    paths = [path for path in (config.text.tokenizer_path, config.text.second_tokenizer_path) if path]
    return CLIPAndT5Tokenizers(paths, config.text.spiece_path, config.text.max_length, config.text.t5_max_length,
                               t5_only=config.model.backbone == "flux")
  if config.text.tokenizer == "clip" and config.text.second_tokenizer_path:
    return CLIPTokenizerPair(config.text.tokenizer_path, config.text.second_tokenizer_path, config.text.max_length)
  if config.text.tokenizer == "clip":
    return CLIPTokenizer(config.text.tokenizer_path, config.text.max_length)
  if config.text.tokenizer == "words":
    from diffusion_jax.data import captioned_shapes, moving_shapes

    vocabularies = {"captioned_shapes": captioned_shapes.VOCABULARY, "moving_shapes": moving_shapes.VOCABULARY}
    if config.data.dataset not in vocabularies:
      raise ValueError("text.tokenizer='words' knows only the built-in datasets' vocabulary; use "
                       "text.tokenizer='sentencepiece' with text.spiece_path for other data.")
    return WordTokenizer(vocabularies[config.data.dataset], config.text.max_length)
  raise ValueError(f"Unknown text.tokenizer {config.text.tokenizer!r}; valid options: ['words', 'sentencepiece', "
                   "'clip'].")
