"""CLIP's byte-level BPE tokenizer, id for id equal to OpenCLIP's `SimpleTokenizer`.

What a caption goes through (OpenCLIP's steps; only the speed is ours):
  1. `clean_text`: ftfy.fix_text, html.unescape twice, whitespace runs -> one space, strip,
     lowercase.
  2. Split into pre-tokens with CLIP's pattern: the literal special tokens, the contractions
     's 't 're 've 'm 'll 'd, letter runs, single digits, runs of anything else; whitespace is
     dropped.
  3. Byte-level BPE of each pre-token (UTF-8 bytes shown as 256 printable symbols, '</w>' on
     the last one) over the 48,894 merges of `assets/bpe_simple_vocab_16e6.txt.gz`.
  4. Row = [SOT] + ids + [EOT], cut to `context_length` with EOT forced into the last slot,
     padded with 0 (which is also the id of '!').

Why it is fast, and why each shortcut is exact (tests/test_tokenizer.py checks each claim):
  - "Plain" text (printable ASCII other than '&', plus tab, newline, form feed, carriage return)
    skips ftfy and unescaping: ftfy's only possible edit there is '\r' -> '\n', which the
    whitespace collapse erases anyway (no '&' -> no HTML entity; no ESC or other control
    character to drop; nothing non-ASCII to re-decode, uncurl, narrow or normalise).
  - Other text runs only the parts of ftfy that can act on it (`text_cleaning.fix_text`), line
    by line as ftfy works: its HTML unescaping, its mojibake detector, quote straightening, an
    NFC check. Only lines with real mojibake, C0/C1 controls, ligatures or full-width forms get
    ftfy.
  - Split: lower-case ASCII text uses a stdlib `re` pattern whose classes are the ASCII parts
    of OpenCLIP's; everything else uses OpenCLIP's own `regex` pattern, IGNORECASE included.
  - BPE: HF `tokenizers`' Rust BPE model, called once per distinct pre-token and memoised in a
    dict (cleared when it reaches `word_cache_size`; no LRU bookkeeping on the hot path).
  - Long texts: only the first `context_length - 2` pre-tokens can reach the row, so a long
    text is cleaned and split only as far as a provably safe cut (see `_head_words`).

Inputs are never a reason to crash: None is the empty caption, bytes are decoded as UTF-8 with
invalid sequences replaced by U+FFFD, control characters are handled as OpenCLIP handles them
(ftfy removes most C0 controls; tab, newline, form feed and carriage return are whitespace), and
a 100 kB caption costs about what its first few hundred characters cost when it is plain or
has line breaks (otherwise ftfy must see the whole line: tens of ms per 100 kB).

The vocabulary file ships in `superclip_jax/assets/` (MIT, (c) 2021 OpenAI; see
LICENSE_bpe_vocab.txt) and is read on first use.
"""
from __future__ import annotations

import functools
import gzip
import html
import pathlib
import re
import threading
from typing import Iterable, Sequence

import numpy as np
import regex
import tokenizers

from superclip_jax import text_cleaning

VOCAB_SIZE = 49408
SOT_ID = 49406  # '<start_of_text>'
EOT_ID = 49407  # '<end_of_text>'; the largest id, so the text tower pools at argmax(ids)
CONTEXT_LENGTH = 77
PAD_ID = 0

SOT_TEXT = "<start_of_text>"
EOT_TEXT = "<end_of_text>"
VOCAB_PATH = pathlib.Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48,894: bytes, bytes + '</w>', merges, 2 specials

# Step 2 exactly as OpenCLIP compiles it (third-party `regex`, IGNORECASE). IGNORECASE matters
# even after lowercasing: 'ſ' (U+017F) matches 's' in "'s" and in the special tokens, and
# U+0345 matches no alternative at all, so it is dropped like whitespace.
SPLIT_PATTERN = regex.compile(
    rf"{SOT_TEXT}|{EOT_TEXT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+",
    regex.IGNORECASE)
# The same split restricted to lower-case ASCII (what `regex` calls \s in ASCII is \t\n\v\f\r
# and space; \p{L} is a-z once lowercased; \p{N} is 0-9). Stdlib `re` runs it ~2x faster.
_SPLIT_ASCII = re.compile(
    rf"{SOT_TEXT}|{EOT_TEXT}|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\t\n\x0b\x0c\r a-z0-9]+")
# The longest fixed alternative above is '<start_of_text>'.
_SPLIT_LOOKAHEAD = 16

# "Plain" text is printable ASCII other than '&', plus \t \n \f \r: ftfy and html.unescape
# cannot change its cleaned form. Any other character sends a text through
# `text_cleaning.fix_text`.
_NON_PLAIN = re.compile(r"[^\t\n\x0c\r\x20-\x25\x27-\x7e]")


# Texts longer than this are cleaned and split only up to a safe cut (`_head_words`).
_LONG_TEXT_CHARS = 512
# Longer pre-tokens are rare and rarely repeat: BPE them directly, do not memoise.
_MAX_CACHED_WORD_CHARS = 48


def clean_text(text: str) -> str:
  """OpenCLIP's 'lower' cleaning: ftfy, HTML-unescape twice, collapse whitespace, lowercase.

  ftfy is skipped where it provably changes nothing that survives whitespace collapsing (see
  the module docstring). Example: ' A&amp;amp;B\\tCafÃ© ' -> 'a&b café'.
  """
  if _NON_PLAIN.search(text) is not None:
    text = html.unescape(html.unescape(text_cleaning.fix_text(text)))
  return " ".join(text.split()).lower()


def as_text(value) -> str:
  """A caption as `str`: None -> '', bytes -> UTF-8 with U+FFFD for invalid sequences.

  Anything else that is not a `str` is a programming error, not bad data: TypeError.
  """
  if isinstance(value, (bytes, bytearray)):  # np.bytes_ too; what tf.numpy_function passes
    return value.decode("utf-8", errors="replace")
  if isinstance(value, str):
    return str(value)  # np.str_ -> str
  if value is None:
    return ""
  if isinstance(value, memoryview):
    return value.tobytes().decode("utf-8", errors="replace")
  raise TypeError(f"a caption must be str, bytes or None, got {type(value).__name__}: "
                  f"{value!r:.80}")


def _first_words(cleaned: str, n_words: int, whole: bool = True) -> list[str] | None:
  """The first `n_words` pre-tokens of a cleaned text (all, if fewer), split from a head.

  The split of a head `cleaned[:k]` agrees with the whole's on every pre-token that ends at
  least `_SPLIT_LOOKAHEAD` characters before the head does (see `_head_words`). Pre-tokens are
  disjoint and non-empty, so when the head gives `n_words + _SPLIT_LOOKAHEAD` of them, its
  first `n_words` end early enough. `whole=False`: `cleaned` is itself only a head of the
  text's cleaned form; None when it does not hold enough pre-tokens to be sure.
  """
  pattern = _SPLIT_ASCII if cleaned.isascii() else SPLIT_PATTERN
  size = 8 * (n_words + _SPLIT_LOOKAHEAD)
  while size < len(cleaned):
    words = pattern.findall(cleaned[:size])
    if len(words) >= n_words + _SPLIT_LOOKAHEAD:
      return words[:n_words]
    size *= 2
  words = pattern.findall(cleaned)
  if whole or len(words) >= n_words + _SPLIT_LOOKAHEAD:
    return words[:n_words]
  return None


def _head_words(text: str, n_words: int) -> list[str]:
  """The first `n_words` pre-tokens of `clean_text(text)` (all, if fewer), for long texts.

  Only a head `text[:cut]` is cleaned where `clean_text(text[:cut])` is provably a prefix of
  `clean_text(text)`:
    - plain text (see `_NON_PLAIN`): any cut (its cleaning is a whitespace collapse, and the
      collapse of a prefix is a prefix of the whole's, and lowercasing ASCII is per character);
    - other text: a cut just after a '\\n' whose ftfy-fixed head still ends in '\\n'. ftfy fixes
      a text line by line, each line depending only on itself and the lines before it; no HTML
      entity and no whitespace run spans the line break, and a line break ends Python's
      final-sigma context of str.lower.
  The head's split then agrees with the whole's on every pre-token that ends at least
  `_SPLIT_LOOKAHEAD` characters before the head does: each pre-token is decided from its start,
  a letter run or symbol run stops at a character both texts share, and no fixed alternative is
  longer than the lookahead. Other text without a line break after the first
  `_LONG_TEXT_CHARS` characters is cleaned whole.
  """
  plain = _NON_PLAIN.search(text) is None
  size = _LONG_TEXT_CHARS
  while size < len(text):
    if not plain:
      newline = text.find("\n", size - 1)
      if newline < 0:
        break
      cut = newline + 1
    else:
      cut = size
    head = text[:cut]
    if _NON_PLAIN.search(head) is not None:
      head = text_cleaning.fix_text(head)
      if not head.endswith("\n"):
        size = 2 * cut
        continue
      head = html.unescape(html.unescape(head))
    head = " ".join(head.split()).lower()
    words = _first_words(head, n_words, whole=False)
    if words is not None:
      return words
    size = 2 * cut
  return _first_words(clean_text(text), n_words)


def _pre_tokens(text: str, max_words: int | None = None) -> list[str]:
  """Pre-tokens of `clean_text(text)`: all, or (max_words > 0) at least the first max_words."""
  if max_words is not None and len(text) > _LONG_TEXT_CHARS:
    return _head_words(text, max_words)
  cleaned = clean_text(text)
  words = (_SPLIT_ASCII if cleaned.isascii() else SPLIT_PATTERN).findall(cleaned)
  if max_words is not None and len(words) > max_words:
    del words[max_words:]  # each pre-token gives at least one id: the rest cannot show
  return words


def _byte_symbols() -> tuple[list[int], dict[int, str]]:
  """CLIP's stand-ins for bytes: (bytes in vocabulary order, byte -> one printable character).

  Bytes that are visible Latin-1 characters stand for themselves; the other 68 (controls, space,
  NBSP, soft hyphen...) take U+0100.. in byte order, so that BPE never sees whitespace.
  """
  visible = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
  hidden = [b for b in range(256) if b not in set(visible)]
  symbol = {b: chr(b) for b in visible}
  symbol.update({b: chr(0x100 + i) for i, b in enumerate(hidden)})
  return visible + hidden, symbol


class ClipTokenizer:
  """OpenCLIP's `SimpleTokenizer` (clean='lower', no reduction), fast. Thread-safe.

  Use the module functions (`tokenize`, `tf_tokenize`, `decode`, `token_names`), which share one
  lazily built instance; build one yourself only for another merges file or cache size.
  """

  def __init__(self, vocab_path: str | pathlib.Path = VOCAB_PATH,
               word_cache_size: int = 200_000):
    lines = gzip.open(vocab_path, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:1 + NUM_MERGES]]  # line 0: a header
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
      raise ValueError(f"{vocab_path}: expected {NUM_MERGES} merges after the header line")
    order, symbol = _byte_symbols()
    pieces = [symbol[b] for b in order]
    pieces += [p + "</w>" for p in pieces]
    pieces += ["".join(m) for m in merges]
    pieces += [SOT_TEXT, EOT_TEXT]
    assert len(pieces) == VOCAB_SIZE
    self.vocab_size = VOCAB_SIZE
    self._pieces = pieces
    self._bpe = tokenizers.models.BPE(
        vocab={p: i for i, p in enumerate(pieces)}, merges=merges, end_of_word_suffix="</w>")
    # str.translate table: a pre-token's UTF-8 bytes, read as Latin-1, -> the BPE symbols.
    self._byte_to_symbol = {b: symbol[b] for b in range(256)}
    symbol_to_byte = {s: b for b, s in symbol.items()}
    self._piece_bytes = [bytes(symbol_to_byte[c] for c in p.removesuffix("</w>"))
                         for p in pieces[:-2]]
    self._word_cache_size = word_cache_size
    self._reset_word_cache()

  def _reset_word_cache(self):
    # OpenCLIP maps these two pre-tokens straight to their ids; every other pre-token is BPE'd.
    self._word_ids = {SOT_TEXT: (SOT_ID,), EOT_TEXT: (EOT_ID,)}

  def _bpe_word(self, word: str) -> tuple[int, ...]:
    # Cleaned text has no lone surrogates (ftfy replaces them); 'surrogatepass' only makes sure
    # that a future change there could not raise here.
    symbols = word.encode("utf-8", "surrogatepass").decode("latin-1")
    return tuple(t.id for t in self._bpe.tokenize(symbols.translate(self._byte_to_symbol)))

  def _learn(self, word: str) -> tuple[int, ...]:
    """BPE ids of a pre-token not in the memo; memoised unless long."""
    word_ids = self._bpe_word(word)
    if len(word) <= _MAX_CACHED_WORD_CHARS:
      if len(self._word_ids) >= self._word_cache_size:
        self._reset_word_cache()
      self._word_ids[word] = word_ids
    return word_ids

  def encode(self, text: str | bytes | None) -> list[int]:
    """All BPE ids of one caption, without SOT/EOT (OpenCLIP's `SimpleTokenizer.encode`)."""
    ids = []
    for word in _pre_tokens(as_text(text)):
      ids += self._word_ids.get(word) or self._learn(word)
    return ids

  def __call__(self, texts, context_length: int = CONTEXT_LENGTH) -> np.ndarray:
    """Token ids [len(texts), context_length] int32; see `tokenize`."""
    _check_context_length(context_length)
    if texts is None or isinstance(texts, (str, bytes, bytearray)):
      texts = [texts]
    texts = list(texts)
    out = np.zeros((len(texts), context_length), np.int32)  # PAD_ID == 0
    if context_length <= 2:
      # OpenCLIP cuts [SOT, ..., EOT] to the context and forces EOT last: the text cannot show.
      out[:, 0] = SOT_ID if context_length == 2 else EOT_ID
      out[:, -1] = EOT_ID
      return out
    keep = context_length - 2
    lengths, flat = [], []  # flat: every row's ids (at most `keep` each), back to back
    memo = self._word_ids.get
    for text in texts:
      start = len(flat)
      for word in _pre_tokens(text if type(text) is str else as_text(text), keep):
        word_ids = memo(word)
        if word_ids is None:
          word_ids = self._learn(word)
          memo = self._word_ids.get  # the memo may have been reset
        flat += word_ids
      if len(flat) - start > keep:
        del flat[start + keep:]
      lengths.append(len(flat) - start)
    # Row i: SOT, its ids, EOT, then padding.
    lengths = np.asarray(lengths, np.int64).reshape(-1)
    out[:, 1:-1][np.arange(keep) < lengths[:, None]] = flat
    out[:, 0] = SOT_ID
    out[np.arange(len(texts)), lengths + 1] = EOT_ID
    return out

  def decode(self, ids) -> str | list[str]:
    """Text of one row of ids (or a list of texts for [batch, length] ids).

    A leading SOT is skipped and decoding stops at the first EOT, so the padding after it is
    ignored. Pre-tokens come back separated by single spaces ('a dog.' -> 'a dog .'), lower
    case, without leading or trailing space. Bytes that do not form UTF-8 become U+FFFD.
    """
    ids = np.asarray(ids)
    if ids.ndim == 2:
      return [self.decode(row) for row in ids]
    if ids.ndim != 1:
      raise ValueError(f"decode takes [length] or [batch, length] ids, got shape {ids.shape}")
    ids = [int(i) for i in ids]
    _check_ids(ids)
    if ids and ids[0] == SOT_ID:
      ids = ids[1:]
    if EOT_ID in ids:
      ids = ids[:ids.index(EOT_ID)]
    out = bytearray()
    for i in ids:
      if i >= SOT_ID:
        out += self._pieces[i].encode() + b" "
      else:
        out += self._piece_bytes[i]
        if i >= 256 and self._pieces[i].endswith("</w>"):
          out += b" "
    return out.decode("utf-8", errors="replace").strip()

  def token_names(self, ids) -> list[str]:
    """A readable name for each vocabulary id (e.g. to print the class head's top-k).

    A piece that ends a word is named by its text ('dog</w>' -> 'dog'); a piece that does not
    gets a trailing '@@' (subword-nmt's convention: 'phot' -> 'phot@@'); the specials keep their
    names ('<start_of_text>', '<end_of_text>'). Bytes that are not complete UTF-8 on their own
    are shown escaped ('\\xe4@@').
    """
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    _check_ids(ids)
    names = []
    for i in ids:
      if i >= SOT_ID:
        names.append(self._pieces[i])
        continue
      name = self._piece_bytes[i].decode("utf-8", errors="backslashreplace")
      ends_word = 256 <= i and self._pieces[i].endswith("</w>")
      names.append(name if ends_word else name + "@@")
    return names


def _check_context_length(context_length):
  if isinstance(context_length, bool) or not isinstance(context_length, (int, np.integer)) \
      or context_length < 1:
    raise ValueError(f"context_length must be a positive int, got {context_length!r}")


def _check_ids(ids: Sequence[int]):
  bad = [i for i in ids if not 0 <= i < VOCAB_SIZE]
  if bad:
    raise ValueError(f"token ids must be in [0, {VOCAB_SIZE}), got {bad[:5]}")


_instance: ClipTokenizer | None = None
_instance_lock = threading.Lock()


def get_tokenizer() -> ClipTokenizer:
  """The shared tokenizer; the vocabulary is read on the first call."""
  global _instance
  if _instance is None:
    with _instance_lock:
      if _instance is None:
        _instance = ClipTokenizer()
  return _instance


def tokenize(texts: Iterable[str | bytes | None] | str | bytes | None,
             context_length: int = CONTEXT_LENGTH) -> np.ndarray:
  """Token ids int32 [len(texts), context_length], equal to OpenCLIP's `tokenize(texts)`.

  Row = [SOT_ID, ids..., EOT_ID, PAD_ID...]; a caption with more than context_length - 2 ids is
  cut and EOT_ID put in the last position (context_length 1 gives [EOT_ID]). A single str or
  bytes is one caption. None and '' give [SOT_ID, EOT_ID, 0, ...]; bytes are decoded as UTF-8
  with U+FFFD for invalid sequences (OpenCLIP accepts only str); literal '<start_of_text>' and
  '<end_of_text>' in a caption become SOT_ID and EOT_ID, as in OpenCLIP.
  """
  return get_tokenizer()(texts, context_length)


def encode(text: str | bytes | None) -> list[int]:
  """All BPE ids of one caption, without SOT/EOT and without truncation."""
  return get_tokenizer().encode(text)


def decode(ids) -> str | list[str]:
  """Text back from ids [length] (or [batch, length]); see `ClipTokenizer.decode`."""
  return get_tokenizer().decode(ids)


def token_names(ids) -> list[str]:
  """Readable names of vocabulary ids, e.g. 'dog' for the id of 'dog</w>'; see
  `ClipTokenizer.token_names`."""
  return get_tokenizer().token_names(ids)


def _tokenize_numpy(texts: np.ndarray, context_length: int) -> np.ndarray:
  """tf.numpy_function body: an array of byte strings of any shape -> [*shape, context]."""
  ids = get_tokenizer()(texts.reshape(-1).tolist(), context_length)
  return ids.reshape(texts.shape + (context_length,))


def tf_tokenize(texts, context_length: int = CONTEXT_LENGTH):
  """`tokenize` as a TensorFlow op, for tf.data: string [N] -> int32 [N, context_length].

  Runs on the host CPU through tf.numpy_function (one Python call per batch, so map it after
  batching). Any input shape works (a scalar gives [context_length]); the static shape is set.
  """
  import tensorflow as tf  # only pipelines need TensorFlow
  _check_context_length(context_length)
  texts = tf.convert_to_tensor(texts, dtype=tf.string)
  ids = tf.numpy_function(
      functools.partial(_tokenize_numpy, context_length=int(context_length)), [texts],
      tf.int32, stateful=False, name="clip_tokenize")
  ids.set_shape(texts.shape.concatenate([context_length]))
  return ids
