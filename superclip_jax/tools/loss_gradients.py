"""How SuperCLIP's two losses pull on the model: per parameter group, the norm of the
contrastive loss's gradient, of the weighted class loss's gradient, and the cosine between
the two, on training batches (docs/study.md, "Why the head does not help here").

  python -m superclip_jax.tools.loss_gradients --workdir=DIR            # its latest checkpoint
  python -m superclip_jax.tools.loss_gradients --workdir=DIR --step=0   # as initialised
  python -m superclip_jax.tools.loss_gradients --config=configs/demo.py --batches=4

A cosine near 1: the head's gradient helps the contrastive objective on those parameters;
near 0: it pulls elsewhere (with AdamW, which scales each parameter's step by its gradients'
size, a larger head gradient then takes over the shared tower's steps); negative: the two
conflict. The gradients are averaged over --batches batches of the run's training stream from
its start, at the checkpoint's parameters and IDF counts (the class loss's weights).
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

# Parameter groups printed first: the image tower (what both losses share), the text tower
# (contrastive only) and the head (class loss only); then any other top-level parameters.
GROUPS = ("visual", "text", "class_head")


def loss_gradients(config, params, idf, batches, seed: int = 0) -> dict[str, dict[str, float]]:
  """{group: {contrastive_norm, class_norm, ratio, cosine}} of the two losses' gradients,
  averaged over `batches` (dicts of numpy arrays as the training stream gives them). The class
  gradient is the weighted one: config.loss.class_weight × d(class loss)."""
  from superclip_jax import losses, models, train_step
  model = models.model_from_config(config.model)
  if not (model.has_text and model.has_head):
    raise ValueError(f"config.model.mode={config.model.mode!r}: both losses are needed "
                     "(mode='superclip')")
  loss = train_step.StepLoss(model, config.loss.contrastive, config.loss.class_weight,
                             frozen=tuple(config.get("frozen", ())))  # LiT: as training

  @jax.jit
  def grads(params, idf, batch):
    targets = losses.class_targets(batch["class_tokens"])
    idf = idf.add_captions(*targets)
    weights = idf.weights() if config.loss.use_idf else jnp.ones((loss.vocab,), jnp.float32)
    rng = jax.random.PRNGKey(seed)

    def term(name):
      return lambda p: loss.terms(loss.forward(p, batch, rng), targets, weights)[name]
    g_contrastive = jax.grad(term("contrastive_loss"))(params)
    g_class = jax.tree.map(lambda g: loss.class_weight * g, jax.grad(term("class_loss"))(params))
    return g_contrastive, g_class, idf

  total_c = total_h = None
  n = 0
  for batch in batches:
    batch = {k: jnp.asarray(v) for k, v in batch.items() if k in loss.input_keys}
    g_c, g_h, idf = grads(params, idf, batch)  # the counts go on, as in training
    total_c = g_c if total_c is None else jax.tree.map(jnp.add, total_c, g_c)
    total_h = g_h if total_h is None else jax.tree.map(jnp.add, total_h, g_h)
    n += 1
  if not n:
    raise ValueError("no batches")
  out = {}
  for group in [*GROUPS, *sorted(set(params) - set(GROUPS))]:
    c = _flat(total_c.get(group)) / n
    h = _flat(total_h.get(group)) / n
    nc, nh = float(np.linalg.norm(c)), float(np.linalg.norm(h))
    out[group] = {"contrastive_norm": nc, "class_norm": nh,
                  "ratio": nh / nc if nc else None,  # None: no contrastive gradient
                  "cosine": float(c @ h / (nc * nh)) if nc and nh else 0.0}
  return out


def _flat(tree) -> np.ndarray:
  if tree is None:
    return np.zeros([0], np.float64)
  leaves = [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)]
  return np.concatenate(leaves) if leaves else np.zeros([0], np.float64)


def training_batches(config, count: int):
  """The first `count` global batches of the run's training stream (this process's rows)."""
  from superclip_jax.data import input_pipeline
  ds = input_pipeline.train_dataset(config)
  it = iter(ds.as_numpy_iterator())
  try:
    return [next(it) for _ in range(count)]
  finally:
    del it


def table(result: dict) -> str:
  lines = ["| parameters | contrastive grad norm | class grad norm (× weight) "
           "| class / contrastive | cosine |", "|---|---|---|---|---|"]
  for group, r in result.items():
    ratio = "–" if r["ratio"] is None else format(r["ratio"], ".3g")
    lines.append(f"| {group} | {r['contrastive_norm']:.4g} | {r['class_norm']:.4g} | "
                 f"{ratio} | {r['cosine']:+.3f} |")
  return "\n".join(lines)


def main(argv):
  del argv
  from superclip_jax import checkpoint, sharding, train_state
  FLAGS = flags.FLAGS
  if not FLAGS["verbosity"].present:  # orbax is chatty at INFO
    logging.set_verbosity(logging.WARNING)
  if bool(FLAGS.workdir) == bool(FLAGS.config):
    raise app.UsageError("give --workdir (a run's checkpoint) or --config (initialisation)")
  if FLAGS.workdir and FLAGS.step != 0:
    config, _, state = checkpoint.load_state(FLAGS.workdir, FLAGS.step)
  else:
    config = checkpoint.read_config(FLAGS.workdir) if FLAGS.workdir else FLAGS.config
    state = train_state.StateFactory(config, sharding.make_mesh(config.mesh)).create()
  result = loss_gradients(config, state.params, state.idf,
                          training_batches(config, FLAGS.batches), seed=config.seed)
  print(f"step {int(state.step)}, {FLAGS.batches} batches of {config.input.batch_size}:")
  print(table(result))
  if FLAGS.json:
    print(json.dumps({"step": int(state.step), **result}))


def define_flags():
  from ml_collections import config_flags
  flags.DEFINE_string("workdir", None, "A run's directory (its config.json and checkpoints).")
  config_flags.DEFINE_config_file("config", None, "A config, for its initial parameters.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest; 0: initialisation).")
  flags.DEFINE_integer("batches", 4, "Training batches the gradients are averaged over.")
  flags.DEFINE_bool("json", False, "Also print the result as one JSON line.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
