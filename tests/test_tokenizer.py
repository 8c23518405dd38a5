"""superclip_jax.tokenizer: OpenCLIP's ids, the exactness of each shortcut, tf.data, bad input."""
import concurrent.futures
import functools
import html
import importlib.util
import json
import pathlib
import random
import re
import sys
import time

import ftfy
import ftfy.fixes
import numpy as np
import pytest
import regex

# open_clip imports torchvision, which segfaults when imported after TensorFlow: import it first,
# and only if no earlier test module has already imported TensorFlow.
try:
  open_clip = None if "tensorflow" in sys.modules else importlib.import_module("open_clip")
except ImportError:
  open_clip = None

from superclip_jax import text_cleaning
from superclip_jax import tokenizer as T

SOT, EOT = T.SOT_ID, T.EOT_ID
_FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def _load_fixture_maker():
  spec = importlib.util.spec_from_file_location(
      "make_tokenizer_fixture", _FIXTURES / "make_tokenizer_fixture.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


maker = _load_fixture_maker()


@functools.cache
def fixture_cases():
  """[(text, OpenCLIP's row for context 77)] from the committed fixture."""
  payload = json.loads((_FIXTURES / "tokenizer_openclip_ids.json").read_text("ascii"))
  assert payload["context_length"] == T.CONTEXT_LENGTH
  cases = []
  for case in payload["cases"]:
    text = case["text"] if "text" in case else maker.expand(case["recipe"])
    row = case["ids"] + [T.PAD_ID] * (T.CONTEXT_LENGTH - len(case["ids"]))
    cases.append((text, row))
  return cases


def openclip_row(ids, context_length):
  """OpenCLIP's framing of encoded ids: SOT + ids + EOT, cut with EOT forced last, 0-padded."""
  tokens = [SOT, *ids, EOT]
  if len(tokens) > context_length:
    tokens = tokens[:context_length]
    tokens[-1] = EOT
  return tokens + [T.PAD_ID] * (context_length - len(tokens))


def openclip_clean(text):
  """OpenCLIP's 'lower' cleaning, spelled out: ftfy, unescape twice, strip, collapse, lower."""
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return " ".join(text.split()).strip().lower()


def plain_texts(n, seed):
  """Random text over the alphabet on which ftfy is skipped."""
  rng = random.Random(seed)
  alphabet = [chr(c) for c in range(0x20, 0x7F) if chr(c) != "&"] + list("\t\n\x0c\r") * 4
  alphabet += ["\r\n", "'s", "'ll", "<start_of_text>", "<end_of_text>", "  ", "\n\n"]
  return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(n)]


# --- vocabulary ------------------------------------------------------------------------------

def test_constants_and_vocabulary():
  assert (T.VOCAB_SIZE, T.SOT_ID, T.EOT_ID, T.CONTEXT_LENGTH, T.PAD_ID) == (
      49408, 49406, 49407, 77, 0)
  asset = pathlib.Path(T.VOCAB_PATH)
  assert asset.stat().st_size == 1_356_917
  license_text = (asset.parent / "LICENSE_bpe_vocab.txt").read_text()
  assert "MIT" in license_text and "Copyright (c) 2021 OpenAI" in license_text
  tok = T.get_tokenizer()
  assert tok is T.get_tokenizer() and tok.vocab_size == 49408
  assert T.token_names([SOT, EOT, 0, 256, 320]) == ["<start_of_text>", "<end_of_text>", "!@@",
                                                     "!", "a"]


# --- equality with OpenCLIP ------------------------------------------------------------------

def test_fixture_is_varied():
  texts = [t for t, _ in fixture_cases()]
  assert len(texts) > 1000
  for needle in ["&amp;amp;", "<END_OF_TEXT>", "cafÃ©", "'s", "\t", "日本", "😀", "\x00",
                 "مرحبا", "1234567890"]:
    assert any(needle in t for t in texts), needle
  assert "" in texts and max(map(len, texts)) >= 100_000


def test_matches_openclip_fixture():
  cases = fixture_cases()
  got = T.tokenize([t for t, _ in cases])
  assert got.dtype == np.int32 and got.shape == (len(cases), 77)
  bad = [(t[:40], got[i].tolist(), row) for i, (t, row) in enumerate(cases)
         if got[i].tolist() != row]
  assert not bad, bad[:3]


def test_matches_openclip_live():
  oc_module = pytest.importorskip("open_clip")
  if open_clip is None:
    pytest.skip("open_clip must be imported before TensorFlow (torchvision segfaults after it)")
  oc = oc_module.get_tokenizer("ViT-B-16")
  oc_simple = oc_module.tokenizer.SimpleTokenizer
  assert isinstance(oc, oc_simple)
  # Same vocabulary, same split pattern.
  tok = T.get_tokenizer()
  assert list(oc.encoder) == tok._pieces
  assert oc.pat.pattern == T.SPLIT_PATTERN.pattern and oc.pat.flags == T.SPLIT_PATTERN.flags

  texts = ([t for t, _ in fixture_cases()] + maker.random_texts(3000, seed=11)
           + maker.random_texts(300, seed=12, max_pieces=200)
           + maker.caption_like_texts(500, seed=13) + maker.hard_captions(3000, seed=16))
  np.testing.assert_array_equal(T.tokenize(texts), oc(texts).numpy())
  short = texts[:200] + maker.random_texts(200, seed=14, max_pieces=60)
  for context_length in (1, 2, 3, 4, 16):
    np.testing.assert_array_equal(T.tokenize(short, context_length),
                                  oc(short, context_length=context_length).numpy())
  for text in maker.random_texts(300, seed=15, max_pieces=80):
    assert T.encode(text) == oc.encode(text), text
    assert T.clean_text(text) == oc.clean_fn(text), text


# --- the shortcuts are exact -----------------------------------------------------------------

def test_clean_text_matches_openclip_cleaning():
  for text in ([t for t, _ in fixture_cases() if len(t) < 5000]
               + maker.random_texts(1000, seed=21)):
    assert T.clean_text(text) == openclip_clean(text), text


def test_plain_text_is_unchanged_by_ftfy_and_unescape():
  """The fast path's claim: on plain text ftfy only rewrites CR, and unescaping does nothing."""
  for text in plain_texts(20_000, seed=31):
    assert T._NON_PLAIN.search(text) is None
    assert ftfy.fix_text(text) == text.replace("\r\n", "\n").replace("\r", "\n"), repr(text)
    assert html.unescape(text) == text
    assert T.clean_text(text) == openclip_clean(text)
  for char in map(chr, range(0x80)):
    if T._NON_PLAIN.search(char) is None:
      assert ftfy.fix_text(f"a{char}b") in (f"a{char}b", "a\nb"), repr(char)
    else:
      assert char in "&\x7f" or ord(char) < 0x20, repr(char)


def test_ftfy_touched_set_matches_the_fixers():
  """Codepoint by codepoint: the per-character fixers change exactly the `_FTFY_TOUCHED` set."""
  assert ftfy.__version__ == "6.3.1", "ftfy changed: re-check text_cleaning.fix_text's reasoning"
  assert set(ftfy.FIXERS) == {
      "unescape_html", "remove_terminal_escapes", "restore_byte_a0", "replace_lossy_sequences",
      "decode_inconsistent_utf8", "fix_c1_controls", "fix_latin_ligatures",
      "fix_character_width", "uncurl_quotes", "fix_line_breaks", "fix_surrogates",
      "remove_control_chars"}
  fixers = [ftfy.fixes.fix_c1_controls, ftfy.fixes.fix_latin_ligatures,
            ftfy.fixes.fix_character_width, ftfy.fixes.fix_line_breaks,
            ftfy.fixes.fix_surrogates, ftfy.fixes.remove_terminal_escapes,
            ftfy.fixes.remove_control_chars]
  quotes = {0x02BC, *range(0x2018, 0x2020)}
  touched = [c for c in range(0x110000) if text_cleaning._FTFY_TOUCHED.match(chr(c))]
  untouched = "".join(chr(c) for c in range(0x110000)
                      if c not in quotes and not text_cleaning._FTFY_TOUCHED.match(chr(c)))
  for fixer in fixers:
    assert fixer(untouched) == untouched, fixer.__name__
  assert ftfy.fixes.uncurl_quotes(untouched) == untouched
  for c in touched:  # and little is routed to ftfy needlessly (ESC and all C1 by choice)
    assert (any(fixer(chr(c)) != chr(c) for fixer in fixers) or c == 0x1B
            or 0x80 <= c < 0xA0), hex(c)
  for c in quotes:
    assert ftfy.fixes.uncurl_quotes(chr(c)) in "'\""


def test_fix_text_shortcut_equals_ftfy(monkeypatch):
  rng = random.Random(44)
  # Multi-line: ftfy fixes line by line, and a '<' turns its HTML unescaping off for the rest.
  lines = maker.random_texts(600, seed=43, max_pieces=10) + ["a <b> c", "x &amp;amp; y", "Ã©"]
  multi = ["\n".join(rng.choice(lines) for _ in range(rng.randint(2, 8))) for _ in range(1500)]
  texts = (maker.random_texts(6000, seed=41) + maker.random_texts(1000, seed=45, max_pieces=60)
           + maker.caption_like_texts(1000, seed=42) + maker.hard_captions(1000, seed=46)
           + multi + [t for t, _ in fixture_cases() if len(t) < 5000])
  for text in texts:
    assert text_cleaning.fix_text(text) == ftfy.fix_text(text), repr(text)
  # The shortcut is really taken for ordinary non-ASCII captions, line by line, through double
  # escaping and after a '<': ftfy is never called.
  monkeypatch.setattr(ftfy, "fix_text", None)
  monkeypatch.setattr(ftfy, "fix_and_explain", None)
  for text in ["café crème", "it’s “quoted” ‘here’", "東京タワー 😀", "naïve — résumé …",
               "Привет, мир", "AT&T", "½ °C ©", "fish &amp;amp; chips", "line one\nline “two”",
               "a <b> tag\n&amp;lt; kept &eacute;", "x\n" * 50 + "déjà vu " * 300]:
    text_cleaning.fix_text(text)


def test_is_bad_scans_only_near_non_ascii():
  """`text_cleaning.is_bad` equals ftfy's `is_bad`; the pattern facts it relies on hold."""
  import re._parser as sre_parse  # noqa: PLC0415 (CPython's own regex parser, 3.11 and 3.12)
  pattern = ftfy.badness.BADNESS_RE
  tree = sre_parse.parse(pattern.pattern, pattern.flags)
  assert tree.getwidth()[1] == text_cleaning._BADNESS_MAX_CHARS
  # No case folding (a non-ASCII letter could then match an ASCII one: K, the Kelvin sign, and
  # k), '^' only at the text's start, '.' not across lines.
  assert not pattern.flags & (re.IGNORECASE | re.MULTILINE | re.DOTALL)

  def chars(op, av):  # the characters one element can match; None: some ASCII can match
    if str(op) == "LITERAL":
      return {av} if av >= 0x80 else None
    if str(op) == "IN":
      out = set()
      for sub_op, sub_av in av:
        if str(sub_op) == "LITERAL" and sub_av >= 0x80:
          out.add(sub_av)
        elif str(sub_op) == "RANGE" and sub_av[0] >= 0x80:
          out.update(range(sub_av[0], sub_av[1] + 1))
        else:
          return None
      return out
    return None

  (branch_op, (_, branches)), = tree.data
  assert str(branch_op) == "BRANCH"
  for branch in branches:  # every match holds a character that only non-ASCII can be
    assert any(chars(op, av) for op, av in branch.data), branch.data
    for op, av in branch.data:  # the only anchor is the text's start (checked below)
      assert str(op) != "AT" or str(av) == "AT_BEGINNING", branch.data
      assert str(op) not in ("ASSERT", "ASSERT_NOT", "GROUPREF"), branch.data
  assert pattern.search("xÃ ", 1) is None and pattern.search("Ã ") is not None

  rng = random.Random(47)
  bad = ["Ã©", "â€™", "Ã ", "Â ", "Ã¨", "Ã¶", "Ñ€", "â€œ", "Ãƒ", "ГўВЂВ", "Œx", "a Ã "]
  texts = [t for t, _ in fixture_cases() if len(t) < 5000] + maker.hard_captions(2000, seed=48)
  texts += ["".join(rng.choice(bad + [" ", "a", "é", "\n", "x" * 9, "日本", "😀"])
                    for _ in range(rng.randint(0, 12))) for _ in range(4000)]
  mismatched = [t for t in texts if text_cleaning.is_bad(t) != ftfy.badness.is_bad(t)]
  assert not mismatched, mismatched[:5]
  assert sum(map(ftfy.badness.is_bad, texts)) > 1000  # both answers are well represented


def test_ascii_split_equals_openclip_split():
  lower_ascii = [chr(c) for c in range(0x80) if not "A" <= chr(c) <= "Z"]
  for c in lower_ascii:
    probe = f"a{c}{c}a{c}1{c}.{c}'{c} {c}<{c}"
    assert T._SPLIT_ASCII.findall(probe) == T.SPLIT_PATTERN.findall(probe), repr(c)
  rng = random.Random(51)
  pieces = lower_ascii + ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "<start_of_text>",
                          "<end_of_text>", "<start_of", "_of_text>", "abc", "123"]
  for _ in range(20_000):
    text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
    assert T._SPLIT_ASCII.findall(text) == T.SPLIT_PATTERN.findall(text), repr(text)


def test_long_text_cut_is_exact(monkeypatch):
  """Cutting long texts early gives the rows that cleaning and splitting everything gives."""
  monkeypatch.setattr(T, "_LONG_TEXT_CHARS", 24)
  rng = random.Random(61)
  texts = maker.random_texts(400, seed=62, max_pieces=120)
  texts += ["".join(rng.choice(["ab ", "\n", "<start_of_text>", "&amp;", "\n&amp", ";x",
                                "ΣΑΣ", "ς\n", "Ã©", "\r\n", "x" * 30, " ", "é\u0301", "'s"])
                    for _ in range(rng.randint(20, 150))) for _ in range(400)]
  texts += [t for t, _ in fixture_cases() if len(t) > 24]
  # ftfy decides per line: a head of one of these lines is fixed differently from the line.
  texts += [unit * 12 + tail for unit in ["ﬁâ€™ ", "Ñ€â€™â€œaÃ©Ã¶ ", "aÑ€â€œÂÃ¶ ", "Ã¶ﬁéÃ¶ "]
            for tail in ["", "\nnext line", "\n" + unit * 12]]
  tok = T.get_tokenizer()
  everything = [tok.encode(text) for text in texts]  # no cut: the whole text is cleaned
  for context_length in (3, 9, 30, 77):
    got = T.tokenize(texts, context_length)
    for text, ids, row in zip(texts, everything, got):
      assert row.tolist() == openclip_row(ids, context_length), repr(text[:80])


# --- tf.data ---------------------------------------------------------------------------------

def test_tf_tokenize_in_tf_data():
  tf = pytest.importorskip("tensorflow")
  texts = [t for t, _ in fixture_cases()
           if not regex.search(r"[\ud800-\udfff]", t)]  # TF strings are UTF-8
  ds = (tf.data.Dataset.from_tensor_slices(texts).batch(64)
        .map(T.tf_tokenize, num_parallel_calls=tf.data.AUTOTUNE))
  assert ds.element_spec.shape.as_list() == [None, 77]
  assert ds.element_spec.dtype == tf.int32
  np.testing.assert_array_equal(np.concatenate([b.numpy() for b in ds]), T.tokenize(texts))
  ds16 = (tf.data.Dataset.from_tensor_slices(texts[:100]).batch(32, drop_remainder=True)
          .map(lambda b: T.tf_tokenize(b, context_length=16)))
  assert ds16.element_spec.shape.as_list() == [32, 16]
  np.testing.assert_array_equal(np.concatenate([b.numpy() for b in ds16]),
                                T.tokenize(texts[:96], 16))
  scalar = T.tf_tokenize(tf.constant("a photo of a dog"))
  assert scalar.shape == (77,)
  np.testing.assert_array_equal(scalar.numpy(), T.tokenize("a photo of a dog")[0])
  invalid = tf.constant([b"\xff\xfe", b""])
  np.testing.assert_array_equal(T.tf_tokenize(invalid).numpy(), T.tokenize([b"\xff\xfe", ""]))


# --- bad input -------------------------------------------------------------------------------

def test_bad_inputs_have_defined_rows():
  rows = T.tokenize([None, "", b"\xff\xfe", "\x00\x01\x1b[31m\x7f", "a\x0bb", "\t \n",
                     b"dog", bytearray(b"dog"), np.bytes_(b"dog"), np.str_("dog")])
  expected = [[SOT, EOT], [SOT, EOT],
              [SOT, 47356, 39802, EOT],  # b'\xff\xfe' -> U+FFFD U+FFFD
              [SOT, EOT],  # ftfy removes the escape sequence and the control characters
              [SOT, 3937, EOT],  # 'ab': ftfy removes \x0b (it is not whitespace to ftfy)
              [SOT, EOT]] + [[SOT, 1929, EOT]] * 4
  assert [r[:len(e)].tolist() for r, e in zip(rows, expected)] == expected
  assert all(not r[len(e):].any() for r, e in zip(rows, expected))
  assert T.tokenize(b"\xff\xfe").tolist() == T.tokenize("\ufffd\ufffd").tolist()
  assert T.tokenize([]).shape == (0, 77)
  assert T.tokenize("a dog", 1).tolist() == [[EOT]]
  assert T.tokenize("a dog", 2).tolist() == [[SOT, EOT]]
  assert T.tokenize("a dog", 3).tolist() == [[SOT, 320, EOT]]
  for context_length in (0, -1, 2.5, True, "77"):
    with pytest.raises(ValueError):
      T.tokenize("a dog", context_length)
  with pytest.raises(TypeError):
    T.tokenize([3])


def test_lone_surrogates_and_random_bytes_do_not_crash():
  rng = random.Random(71)
  blobs = [bytes(rng.randrange(256) for _ in range(rng.randint(0, 300))) for _ in range(300)]
  rows = T.tokenize(blobs + ["\ud800", "a\udcffb", "\ud83d\ude00"])
  assert rows.shape == (303, 77) and (rows[:, 0] == SOT).all()
  tok = T.get_tokenizer()
  for blob, row in zip(blobs, rows):
    assert row.tolist() == openclip_row(tok.encode(blob), 77)
  assert rows[-1].tolist() == T.tokenize("😀")[0].tolist()  # ftfy joins the surrogate pair


def test_100kb_captions_are_exact_and_fast():
  tok = T.get_tokenizer()
  texts = {"plain": "a photo of a dog on the beach. " * 3300,
           "lines": "naïve line\n" * 9100,
           "one word": "x" * 100_000,
           "whitespace": " \t\n" * 33_000,
           "controls": "\x00\x01" * 50_000}
  budget_s = {"plain": 0.01, "lines": 0.05, "one word": 0.2, "whitespace": 0.05,
              "controls": 0.2}
  for name, text in texts.items():
    T.tokenize([text])  # warm the word cache
    start = time.perf_counter()
    row = T.tokenize([text])[0]
    elapsed = time.perf_counter() - start
    assert row.tolist() == openclip_row(tok.encode(text), 77), name
    assert elapsed < budget_s[name] * 5, (name, elapsed)  # 5x slack for busy machines
  assert T.tokenize([texts["whitespace"]])[0, :2].tolist() == [SOT, EOT]
  assert (T.tokenize([texts["plain"]])[0] != 0).all()


# --- decode, names, threads ------------------------------------------------------------------

def test_decode_round_trip_and_token_names():
  texts = ["a photo of a dog", "Two CATS   sleeping", "photography 123", "dog."]
  rows = T.tokenize(texts)
  assert T.decode(rows) == ["a photo of a dog", "two cats sleeping", "photography 1 2 3",
                            "dog ."]
  assert T.decode(rows[0]) == "a photo of a dog"
  assert T.decode(T.encode("naïve café 東京 😀")) == "naïve café 東京 😀"
  assert T.decode([SOT, 1929, EOT, 320, 0, 0]) == "dog"  # stops at the first EOT
  dog = int(rows[0][5])
  assert T.token_names([dog]) == ["dog"] and T.token_names(np.array([[dog]])) == ["dog"]
  assert T.token_names(T.encode("über")) == ["ü@@", "ber"]
  assert T.token_names(T.encode("東")) == ["\\xe6\\x9d@@", "\\xb1"]
  names = T.token_names(np.arange(T.VOCAB_SIZE))
  assert len(names) == T.VOCAB_SIZE and names[SOT] == "<start_of_text>"
  for bad in ([T.VOCAB_SIZE], [-1]):
    with pytest.raises(ValueError):
      T.token_names(bad)
    with pytest.raises(ValueError):
      T.decode(bad)


def test_threads_and_a_tiny_word_cache_give_the_same_ids():
  texts = maker.caption_like_texts(2000, seed=81) + maker.random_texts(500, seed=82)
  expected = T.tokenize(texts)
  tiny = T.ClipTokenizer(word_cache_size=8)
  np.testing.assert_array_equal(tiny(texts), expected)
  assert len(tiny._word_ids) <= 8
  chunks = [texts[i::4] for i in range(4)]
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    results = list(pool.map(tiny, chunks))
  for i, result in enumerate(results):
    np.testing.assert_array_equal(result, expected[i::4])


def test_bench_public_path_on_hard_text_runs():
  """The benchmark's public-path mode runs, checks ids against OpenCLIP, and reports each kind."""
  pytest.importorskip("open_clip")
  import subprocess  # noqa: PLC0415
  root = pathlib.Path(__file__).resolve().parents[1]
  out = subprocess.run(
      [sys.executable, str(root / "bench" / "bench_tokenizer.py"), "--corpus=hard",
       "--path=public", "--captions=400", "--runs=2"],
      capture_output=True, text=True, timeout=300, check=True).stdout
  assert "ratio (captions per CPU-second" in out and "MISMATCH" not in out
  kinds = [line.split("|")[1].strip() for line in out.splitlines()
           if line.startswith("| ") and not line.startswith("| kind")]
  assert kinds == ["plain", "long", "non-ASCII", "emoji", "entities", "mojibake"]
