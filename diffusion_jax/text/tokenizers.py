"""Tokenizers: caption strings -> (ids [n, max_length] int32, mask [n, max_length] bool).

`WordTokenizer` covers closed vocabularies (the built-in datasets); `SentencePieceTokenizer` loads a
sentencepiece model from a local path (T5's `spiece.model`). Both pad to max_length and truncate an
over-long prompt with a warning; an empty prompt gives an all-padding row (mask all False).
"""

import logging
import re

import numpy as np

PAD_ID = 0


def _pack(token_lists, max_length, texts):
  ids = np.zeros((len(token_lists), max_length), np.int32)
  for row, (tokens, text) in enumerate(zip(token_lists, texts)):
    if len(tokens) > max_length:
      logging.warning("Prompt has %d tokens, truncated to max_length=%d: %r", len(tokens), max_length, text)
      tokens = tokens[:max_length]
    ids[row, :len(tokens)] = tokens
  return ids, ids != PAD_ID


class WordTokenizer:
  """Lower-cased words of a fixed vocabulary; id 0 = padding, 1 = unknown word."""

  def __init__(self, vocabulary, max_length: int):
    self.vocabulary = tuple(vocabulary)
    self.max_length = max_length
    self._ids = {word: i + 2 for i, word in enumerate(self.vocabulary)}

  @property
  def vocab_size(self) -> int:
    return len(self.vocabulary) + 2

  def __call__(self, texts):
    texts = [t.decode() if isinstance(t, bytes) else t for t in texts]
    token_lists = [[self._ids.get(w, 1) for w in re.findall(r"[a-z0-9]+", t.lower())] for t in texts]
    return _pack(token_lists, self.max_length, texts)


class SentencePieceTokenizer:
  """A sentencepiece model from a local file, with an end-of-sequence token appended (as T5 does)."""

  def __init__(self, model_path: str, max_length: int):
    import sentencepiece

    try:
      self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
    except (OSError, RuntimeError) as error:
      raise ValueError(f"Cannot load a sentencepiece model from {model_path!r} ({error}); give the path of a "
                       "local spiece.model file.") from None
    if self._sp.pad_id() != PAD_ID:
      raise ValueError(f"sentencepiece model {model_path!r} has pad id {self._sp.pad_id()}, expected {PAD_ID} "
                       "(T5 convention).")
    self.max_length = max_length

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def __call__(self, texts):
    texts = [t.decode() if isinstance(t, bytes) else t for t in texts]
    token_lists = [self._sp.encode(t) + [self._sp.eos_id()] if t else [] for t in texts]
    return _pack(token_lists, self.max_length, texts)


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
  if config.text.tokenizer == "words":
    from diffusion_jax.data import captioned_shapes, moving_shapes

    vocabularies = {"captioned_shapes": captioned_shapes.VOCABULARY, "moving_shapes": moving_shapes.VOCABULARY}
    if config.data.dataset not in vocabularies:
      raise ValueError("text.tokenizer='words' knows only the built-in datasets' vocabulary; use "
                       "text.tokenizer='sentencepiece' with text.spiece_path for other data.")
    return WordTokenizer(vocabularies[config.data.dataset], config.text.max_length)
  raise ValueError(f"Unknown text.tokenizer {config.text.tokenizer!r}; valid options: ['words', 'sentencepiece'].")
