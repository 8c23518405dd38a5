"""ftfy.fix_text, computed without most of ftfy where the answer is provably known.

The tokenizer's cleaning step (OpenCLIP's: ftfy, then HTML unescaping) spends most of its time
in ftfy on text that ftfy leaves alone. `fix_text` follows ftfy segment by segment and round by
round, and calls ftfy only for a segment that provably needs it. tests/test_tokenizer.py
compares it with ftfy itself and checks each claim below on ftfy's own tables and patterns.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Iterable

import ftfy
import ftfy.badness
import ftfy.chardata
import ftfy.fixes


def _char_class(codepoints: Iterable[int]) -> str:
  """A regex character class matching exactly `codepoints`, as ranges."""
  points, parts = sorted(set(codepoints)), []
  i = 0
  while i < len(points):
    j = i
    while j + 1 < len(points) and points[j + 1] == points[j] + 1:
      j += 1
    parts.append(f"\\U{points[i]:08x}" + (f"-\\U{points[j]:08x}" if j > i else ""))
    i = j + 1
  return "[" + "".join(parts) + "]"


# Every character that one of ftfy's per-character fixers (other than uncurl_quotes) rewrites or
# removes: C1 controls, Latin ligatures, full/half-width forms, the line breaks \r U+0085
# U+2028 U+2029, surrogates, and the control characters (ESC included). A test checks the set
# against the fixers themselves, codepoint by codepoint.
_FTFY_TOUCHED = re.compile(_char_class([
    *range(0x80, 0xA0), *ftfy.chardata.LIGATURES, *ftfy.chardata.WIDTH_MAP,
    *ftfy.chardata.CONTROL_CHARS, 0x0D, 0x85, 0x2028, 0x2029, 0x1B, *range(0xD800, 0xE000)]))
_FTFY_SEGMENT_CHARS = ftfy.TextFixerConfig().max_decode_length
# What ftfy's uncurl_quotes straightens (its SINGLE_QUOTE_RE and DOUBLE_QUOTE_RE together).
_CURLY_QUOTE = re.compile(
    f"{ftfy.chardata.SINGLE_QUOTE_RE.pattern}|{ftfy.chardata.DOUBLE_QUOTE_RE.pattern}")

# ftfy's mojibake detector (`ftfy.badness.is_bad`: does BADNESS_RE match anywhere?) scans the
# whole text with a 4 kB alternation, ~25 ns a character. Every match is at most
# `_BADNESS_MAX_CHARS` long and holds a non-ASCII character (tests/test_tokenizer.py checks both
# on the pattern itself), so only the windows around non-ASCII runs need scanning: `is_bad`.
_BADNESS_MAX_CHARS = 7
_NON_ASCII_RUN = re.compile(r"[^\x00-\x7f]+")


def is_bad(text: str) -> bool:
  """`ftfy.badness.is_bad(text)`, scanning only where a match can be.

  `search(text, pos, endpos)` sees text[pos:endpos] with its real start: the pattern's one
  anchor (`^`, the start of the text) still matches only at index 0.
  """
  if text.isascii():
    return False
  search, reach = ftfy.badness.BADNESS_RE.search, _BADNESS_MAX_CHARS - 1
  for run in _NON_ASCII_RUN.finditer(text):
    if search(text, max(0, run.start() - reach), run.end() + reach) is not None:
      return True
  return False


def fix_text(text: str) -> str:
  """`ftfy.fix_text(text)`, computed without most of ftfy where the answer is provably known.

  ftfy fixes a text in segments, each a line with its '\\n' (or `_FTFY_SEGMENT_CHARS` of a
  longer line), one after another: a segment depends only on itself and on whether it or an
  earlier one held a '<' (from then on, ftfy's HTML unescaping is off). So the text is fixed
  here segment by segment (`_fix_segment`) with that flag carried along, as ftfy does.
  """
  if "\n" not in text and len(text) < _FTFY_SEGMENT_CHARS:
    return _fix_segment(text, "<" not in text)
  out, pos, unescape = [], 0, True
  while pos < len(text):
    end = text.find("\n", pos) + 1 or len(text)
    if end - pos > _FTFY_SEGMENT_CHARS:
      return ftfy.fix_text(text)  # a line of a million characters: ftfy's own cutting
    segment = text[pos:end]
    unescape = unescape and "<" not in segment
    out.append(_fix_segment(segment, unescape))
    pos = end
  return "".join(out)


def _fix_segment(segment: str, unescape: bool) -> str:
  """ftfy's fix of one segment (no '\\n' but maybe a last one), HTML unescaping on or off.

  ftfy repeats rounds of these steps until one changes nothing: HTML unescaping (if on),
  mojibake repair (which acts only where ftfy's `is_bad` finds mojibake), the per-character
  fixers (which act only on the characters in `_FTFY_TOUCHED`, and curly quotes), NFC. A round
  is followed here as long as it provably needs none of the rest: after unescaping, no
  character in `_FTFY_TOUCHED` and not `is_bad` (so the repair and the fixers but quote
  straightening do nothing), NFC once quotes are straightened (which adds only ' and ", never
  touched by any step). The first round that changes nothing gives the answer; a round that
  needs more of ftfy hands the segment to ftfy.
  """
  text = segment
  while True:
    fixed = ftfy.fixes.unescape_html(text) if unescape and "&" in text else text
    if _FTFY_TOUCHED.search(fixed) is not None or is_bad(fixed):
      return _ftfy_segment(segment, unescape)
    if _CURLY_QUOTE.search(fixed) is not None:
      fixed = ftfy.fixes.uncurl_quotes(fixed)
    if not unicodedata.is_normalized("NFC", fixed):
      return _ftfy_segment(segment, unescape)
    if fixed == text:
      return fixed
    text = fixed


def _ftfy_segment(segment: str, unescape: bool) -> str:
  return ftfy.fix_and_explain(segment, _FTFY_CONFIGS[unescape])[0]


# ftfy.fix_text's configuration, and the one it switches to after a segment with a '<'.
_FTFY_CONFIGS = {True: ftfy.TextFixerConfig(explain=False),
                 False: ftfy.TextFixerConfig(explain=False, unescape_html=False)}
