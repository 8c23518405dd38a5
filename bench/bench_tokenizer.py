"""Captions per second per CPU core: our tokenizer inside tf.data vs OpenCLIP's, side by side.

  python bench/bench_tokenizer.py            # 20,000 captions, 5 runs each
  python bench/bench_tokenizer.py --quick    # 4,000 captions, 3 runs each

Both tokenize the same varied captions (generated from word lists: numbers, punctuation, mixed
case, and about 6% with non-ASCII text, 2% with HTML entities), in batches of --batch.
  ours:     tf.data.Dataset.from_tensor_slices(captions).batch(B).map(tf_tokenize), one thread
            (private_threadpool_size=1, max_intra_op_parallelism=1), the result consumed.
  OpenCLIP: open_clip.get_tokenizer('ViT-B-16') called on the same batches (a plain loop).
Speed is captions per second of process CPU time (all threads counted, so "per core"); wall
time is printed too. The first run of each starts with empty word caches ("cold"); the median of
the later runs ("warm") is the headline ratio. Both outputs are checked equal.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_SUBJECTS = """man woman child boy girl dog cat puppy kitten horse bird eagle owl duck cow sheep
goat pig rabbit bear lion tiger elephant giraffe zebra monkey fish shark whale dolphin turtle
frog snake car truck bus train bicycle motorcycle airplane boat ship tractor house building
bridge tower castle church temple skyscraper cabin tent lighthouse barn kitchen bedroom bathroom
office classroom library restaurant cafe bakery market street road highway park garden forest
beach mountain lake river waterfall desert island field meadow city village harbor stadium
pizza burger sandwich salad soup cake cookie donut coffee tea wine beer bottle cup plate bowl
chair table sofa bed lamp clock mirror window door laptop phone camera guitar piano violin
drum book newspaper poster painting sculpture flower rose tulip sunflower tree palm cactus
shirt dress jacket hat shoes sneakers boots bag backpack watch necklace ring glasses umbrella
logo icon pattern texture illustration vector cartoon diagram map chart infographic""".split()
_ADJECTIVES = """red blue green yellow black white gray brown orange purple pink golden silver
old new small large tiny huge vintage modern rustic elegant cozy bright dark colorful wooden
metal glass plastic wet dry sunny cloudy snowy rainy foggy happy smiling sleeping running
beautiful cute funny scary abstract minimalist realistic detailed blurry aerial closeup
panoramic handmade organic fresh frozen spicy sweet delicious luxury cheap portable wireless
waterproof retro classic futuristic traditional""".split()
_VERBS = """sitting standing walking running jumping flying swimming eating drinking playing
reading writing cooking riding driving holding wearing looking smiling laughing sleeping
resting posing dancing singing working painting climbing surfing skiing skating fishing""".split()
_PREPS = "on in at near under above behind beside with by next to across over".split()
_PLACES = """paris london tokyo new york berlin rome madrid sydney toronto chicago seattle
boston dubai singapore amsterdam prague vienna lisbon istanbul cairo mumbai seoul""".split()
_BRANDS = ["iPhone", "Samsung", "Nike", "Adidas", "IKEA", "LEGO", "Canon", "Sony", "Toyota",
           "BMW", "Coca-Cola", "Starbucks", "Amazon", "eBay", "Etsy", "Shutterstock"]
_UNICODE = ["café", "naïve", "jalapeño", "crème brûlée", "São Paulo", "Zürich", "Kraków",
            "München", "smörgåsbord", "piñata", "déjà vu", "“quoted”", "it’s", "—", "…",
            "🙂", "🐶", "❤️", "🍕", "😂👍", "東京", "北京の夜", "서울", "Москва", "Αθήνα",
            "القاهرة", "°C", "½ price", "© 2019", "™", "№5"]
_ENTITIES = ["&amp;", "&quot;", "&#39;", "&amp;amp;", "&gt;", "&nbsp;"]


def make_captions(n: int, seed: int = 0) -> list[str]:
  """`n` varied alt-text-like captions (not one repeated)."""
  rng = random.Random(seed)

  def phrase():
    words = [rng.choice(_ADJECTIVES) for _ in range(rng.randint(0, 2))]
    return " ".join(words + [rng.choice(_SUBJECTS)])

  captions = []
  for _ in range(n):
    style = rng.random()
    if style < 0.45:
      text = f"{rng.choice(['a', 'the', 'two', 'A', 'The'])} {phrase()} {rng.choice(_VERBS)} " \
             f"{rng.choice(_PREPS)} the {phrase()}"
    elif style < 0.65:
      text = f"{phrase().title()} in {rng.choice(_PLACES).title()}, {rng.randint(1950, 2024)}"
    elif style < 0.80:
      text = (f"{rng.choice(_BRANDS)} {phrase()} {rng.choice(['model', 'size', 'no.', 'v'])}"
              f"{rng.randint(1, 99999)} - {rng.choice(_ADJECTIVES).upper()} "
              f"{rng.choice(['SALE', 'NEW', 'Free Shipping', '50% OFF'])}!")
    elif style < 0.90:
      text = (f"Stock photo: {phrase()} {rng.choice(_PREPS)} {phrase()}. "
              f"ID {rng.randint(10**5, 10**9)} #{rng.choice(_SUBJECTS)} "
              f"#{rng.choice(_ADJECTIVES)}{rng.choice(_SUBJECTS)}")
    else:
      text = f"{phrase()} ({rng.randint(1, 500)} x {rng.randint(1, 500)} px) " \
             f"{rng.choice(_VERBS)}   {rng.choice(_PREPS)}\t{phrase()}..."
    if rng.random() < 0.06:
      words = text.split(" ")
      words.insert(rng.randrange(len(words) + 1), rng.choice(_UNICODE))
      text = " ".join(words)
    if rng.random() < 0.02:
      text = text.replace(" ", f" {rng.choice(_ENTITIES)} ", 1)
    captions.append(text)
  return captions


# The hard corpus (--corpus=hard): what web captions hold beside plain alt text, by kind and
# share. "long" are 5-40 captions joined into one text, a third of them one per line (up to
# ~2,500 characters, Recap-style descriptions); "mojibake" are UTF-8 read as Windows-1252 (what
# ftfy exists to repair: both tokenizers must run ftfy's decoder on these).
HARD_KINDS = (("plain", 0.35), ("long", 0.15), ("non-ASCII", 0.20), ("emoji", 0.15),
              ("entities", 0.12), ("mojibake", 0.03))
_EMOJI = ["🙂", "🐶", "❤️", "🍕", "😂", "👍", "🔥", "✨", "👇🏽", "🇫🇷", "👨‍👩‍👧"]
_MOJIBAKE = ["cafÃ©", "Ã¼ber", "donâ€™t", "â€œniceâ€\x9d", "naÃ¯ve", "piÃ±ata", "Â£5"]


def make_hard_captions(n: int, seed: int = 0) -> list[tuple[str, str]]:
  """`n` (kind, caption) pairs of the kinds in `HARD_KINDS`, in their shares."""
  rng = random.Random(seed)
  plain = make_captions(n, seed + 1)
  kinds, weights = zip(*HARD_KINDS)
  out = []
  for i in range(n):
    kind = rng.choices(kinds, weights)[0]
    words = plain[i].split(" ")
    if kind == "long":
      sentences = [plain[rng.randrange(n)] + rng.choice(".!?;") for _ in range(rng.randint(5, 40))]
      text = ("\n" if rng.random() < 1 / 3 else " ").join(sentences)
    elif kind in ("non-ASCII", "entities"):
      extra = _UNICODE if kind == "non-ASCII" else _ENTITIES + ["&lt;b&gt;", "&#8217;", "&eacute;"]
      for _ in range(rng.randint(1, 4)):
        words.insert(rng.randrange(len(words) + 1), rng.choice(extra))
      text = " ".join(words)
    elif kind == "emoji":
      text = " ".join(words) + " " + "".join(rng.choice(_EMOJI) for _ in range(rng.randint(1, 6)))
    elif kind == "mojibake":
      words.insert(rng.randrange(len(words) + 1), rng.choice(_MOJIBAKE))
      text = " ".join(words)
    else:
      text = plain[i]
    out.append((kind, text))
  return out


def public_runners(captions, batch):
  """`tokenize` as users call it and OpenCLIP's tokenizer, on the same batches, no tf.data."""
  import open_clip
  from superclip_jax import tokenizer
  oc = open_clip.get_tokenizer("ViT-B-16")
  batches = [captions[i:i + batch] for i in range(0, len(captions), batch)]
  return (lambda: np.concatenate([tokenizer.tokenize(b) for b in batches]),
          lambda: np.concatenate([oc(b).numpy() for b in batches]), oc)


def openclip_runner(captions, batch):
  import open_clip
  oc = open_clip.get_tokenizer("ViT-B-16")

  def run():
    return np.concatenate([oc(captions[i:i + batch]).numpy()
                           for i in range(0, len(captions), batch)])
  return oc, run


def ours_runner(captions, batch):
  import tensorflow as tf
  from superclip_jax import tokenizer
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  ds = (tf.data.Dataset.from_tensor_slices(captions).batch(batch)
        .map(tokenizer.tf_tokenize, num_parallel_calls=1).with_options(options))

  def run():
    return np.concatenate([b.numpy() for b in ds])
  return run


def measure(run, reset, runs):
  """[(CPU seconds, wall seconds, ids)] per run; the first run starts from `reset()`."""
  samples = []
  for r in range(runs):
    if r == 0:
      reset()
    cpu, wall = time.process_time(), time.perf_counter()
    out = run()
    samples.append((time.process_time() - cpu, time.perf_counter() - wall, out))
  return samples


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="4,000 captions, 3 runs")
  parser.add_argument("--captions", type=int, default=None)
  parser.add_argument("--runs", type=int, default=None)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--corpus", choices=("alt", "hard"), default="alt",
                      help="alt: alt-text-like captions; hard: HARD_KINDS (long, emoji, ...)")
  parser.add_argument("--path", choices=("tfdata", "public"), default="tfdata",
                      help="ours inside tf.data (tf_tokenize), or tokenizer.tokenize as called "
                           "from Python, timed alternately with OpenCLIP's, run by run")
  args = parser.parse_args()
  n = args.captions or (4000 if args.quick else 20000)
  runs = args.runs or (3 if args.quick else 5)
  kinds = make_hard_captions(n) if args.corpus == "hard" else [("alt", c) for c in make_captions(n)]
  captions = [c for _, c in kinds]
  print(f"{args.corpus} corpus: {n} captions ({len(set(captions))} distinct, "
        f"{sum(not c.isascii() for c in captions)} non-ASCII, "
        f"{sum('&' in c for c in captions)} with '&', {sum(map(len, captions)) / n:.0f} "
        f"characters on average), batch {args.batch}, {runs} runs, path {args.path}")

  # open_clip (torchvision) before TensorFlow: importing torchvision after TF segfaults.
  import open_clip  # noqa: F401
  from superclip_jax import tokenizer

  def reset_ours():
    tokenizer.get_tokenizer()._reset_word_cache()

  def reset_theirs():
    oc.cache.clear()
    oc.cache.update({t: t for t in ("<start_of_text>", "<end_of_text>")})

  if args.path == "public":
    ours_run, oc_run, oc = public_runners(captions, args.batch)
    ours_run()
    ours, theirs = [], []
    for r in range(runs):  # alternately, so both see the same machine state
      ours += measure(ours_run, reset_ours, 1) if r == 0 else measure(ours_run, int, 1)
      theirs += measure(oc_run, reset_theirs, 1) if r == 0 else measure(oc_run, int, 1)
  else:
    import tensorflow as tf  # noqa: F401  (import cost outside the timings)
    ours_run = ours_runner(captions, args.batch)
    ours_run()  # builds the tf.data graph and reads the vocabulary
    ours = measure(ours_run, reset_ours, runs)
    oc, oc_run = openclip_runner(captions, args.batch)
    theirs = measure(oc_run, reset_theirs, runs)

  if not np.array_equal(ours[-1][2], theirs[-1][2]):
    raise SystemExit("MISMATCH: our ids differ from OpenCLIP's")

  def rates(samples):
    warm = samples[1:] or samples
    return (n / samples[0][0], n / statistics.median(s[0] for s in warm),
            n / statistics.median(s[1] for s in warm))

  o_cold, o_cpu, o_wall = rates(ours)
  t_cold, t_cpu, t_wall = rates(theirs)
  name = "ours (tf.data, tf_tokenize)" if args.path == "tfdata" else "ours (tokenize)"
  print(f"{'':32s}{'cold/CPU-s':>12s}{'warm/CPU-s':>12s}{'warm/wall-s':>12s}")
  print(f"{name:32s}{o_cold:12,.0f}{o_cpu:12,.0f}{o_wall:12,.0f}")
  print(f"{'OpenCLIP SimpleTokenizer':32s}{t_cold:12,.0f}{t_cpu:12,.0f}{t_wall:12,.0f}")
  ratios = (sorted(t[0] / o[0] for o, t in zip(ours[1:], theirs[1:]))
            if args.path == "public" else [])
  spread = f", run by run {ratios[0]:.1f}-{ratios[-1]:.1f}x" if ratios else ""
  print(f"ratio (captions per CPU-second, warm median): {o_cpu / t_cpu:.1f}x "
        f"(cold: {o_cold / t_cold:.1f}x{spread})")
  if args.corpus == "hard":  # where the time goes, kind by kind (warm caches, public path)
    print("\n| kind | share | ours captions/CPU-s | OpenCLIP | ratio | share of our time |")
    print("|---|---|---|---|---|---|")
    total = ours[-1][0]
    for kind, _ in HARD_KINDS:
      sub = [c for k, c in kinds if k == kind]
      mine = statistics.median(s[0] for s in measure(lambda: tokenizer.tokenize(sub), int, 3))
      theirs_k = statistics.median(s[0] for s in measure(lambda: oc(sub).numpy(), int, 3))
      print(f"| {kind} | {len(sub) / n:.0%} | {len(sub) / mine:,.0f} | {len(sub) / theirs_k:,.0f}"
            f" | {theirs_k / mine:.1f}x | {mine / total:.0%} |")


if __name__ == "__main__":
  main()
