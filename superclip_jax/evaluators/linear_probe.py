"""Linear probe: L2-regularised logistic regression on frozen image features.

Features of the train and test images are computed once per evaluation; then, in JAX on one
device (every process computes the same thing):
  1. features are standardised with the train mean and standard deviation;
  2. a fixed `val_fraction` of the train examples (a seeded permutation) is held out and a
     multinomial logistic regression is fitted on the rest for each L2 strength in `l2_grid`,
     strongest first, each fit starting from the previous one (full-batch L-BFGS);
  3. the strength with the best held-out top-1 is kept (ties: the stronger), the model is
     refitted on all train examples and scored on the test set.
The objective is mean cross-entropy + l2 / 2 * ||W||^2 (the bias is not penalised); CLIP's
probe uses scikit-learn's L-BFGS logistic regression with the same kind of sweep, where
C = 1 / (l2 * num_train).

    config.evals.linear_probe_cifar10 = dict(
        type='linear_probe', every_steps=0, batch_size=512,
        train_data='tfds:cifar10:train', test_data='tfds:cifar10:test')

Fields: the keyword-only arguments of `LinearProbeEvaluator` (docs/evaluation.md).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from superclip_jax.evaluators import common, eval_data

DEFAULT_L2_GRID = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
FEATURES = ("embedding", "patch_mean")


def _loss(params, x, y, l2):
  logits = x @ params["w"] + params["b"]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return ce + 0.5 * l2 * jnp.sum(params["w"] ** 2)


@functools.partial(jax.jit, static_argnames=("max_iters",))
def _lbfgs(params, x, y, l2, tol, max_iters: int):
  loss = functools.partial(_loss, x=x, y=y, l2=l2)
  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  def step(carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=loss)
    return optax.apply_updates(params, updates), state

  def keep_going(carry):
    _, state = carry
    count = optax.tree.get(state, "count")
    grad_norm = optax.tree.norm(optax.tree.get(state, "grad"))
    return (count == 0) | ((count < max_iters) & (grad_norm >= tol))

  params, state = jax.lax.while_loop(keep_going, step, (params, opt.init(params)))
  return params, optax.tree.get(state, "count")


def fit_logistic_regression(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float, *,
                            init=None, max_iters: int = 1000, tol: float = 1e-6) -> dict:
  """Minimises mean cross-entropy + l2/2 ||w||^2 by full-batch L-BFGS.

  x [n, d] float, y [n] int in [0, num_classes). Returns {'w' [d, classes], 'b' [classes]}.
  """
  x = jnp.asarray(x, jnp.float32)
  if init is None:
    init = {"w": jnp.zeros((x.shape[1], num_classes), jnp.float32),
            "b": jnp.zeros((num_classes,), jnp.float32)}
  params, _ = _lbfgs(init, x, jnp.asarray(y, jnp.int32), jnp.float32(l2), jnp.float32(tol),
                     max_iters)
  return params


def predict_ranks(params, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  logits = jnp.asarray(x, jnp.float32) @ params["w"] + params["b"]
  return np.asarray(common.rank_of_true(logits, jnp.asarray(y, jnp.int32)))


def linear_probe(train_x, train_y, test_x, test_y, num_classes: int, *,
                 l2_grid=DEFAULT_L2_GRID, val_fraction: float = 0.2, seed: int = 0,
                 max_iters: int = 1000, ks=(1, 5)) -> dict:
  """The probe's metrics: test top-k, the chosen l2 and its held-out top-1 (see module doc)."""
  train_x, test_x = np.asarray(train_x, np.float32), np.asarray(test_x, np.float32)
  train_y, test_y = np.asarray(train_y), np.asarray(test_y)
  if len(train_x) < 2 or not len(test_x):
    raise ValueError(f"linear probe needs >= 2 train and >= 1 test examples, got "
                     f"{len(train_x)} and {len(test_x)}")
  if not 0 < val_fraction < 1:
    raise ValueError(f"linear probe val_fraction={val_fraction} must be in (0, 1)")
  for name, y in (("train", train_y), ("test", test_y)):
    if y.min() < 0 or y.max() >= num_classes:
      raise ValueError(f"linear probe {name} labels must be in [0, {num_classes})")
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  train_x, test_x = (train_x - mean) / std, (test_x - mean) / std

  order = np.random.default_rng(seed).permutation(len(train_x))
  num_val = min(max(1, int(round(val_fraction * len(train_x)))), len(train_x) - 1)
  val, fit = order[:num_val], order[num_val:]
  best = (-1.0, None, None)  # (val top-1, l2, params)
  params = None
  for l2 in sorted(l2_grid, reverse=True):
    params = fit_logistic_regression(train_x[fit], train_y[fit], num_classes, l2, init=params,
                                     max_iters=max_iters)
    val_top1 = float(np.mean(predict_ranks(params, train_x[val], train_y[val]) == 0))
    if val_top1 > best[0]:
      best = (val_top1, l2, params)
  val_top1, l2, params = best
  params = fit_logistic_regression(train_x, train_y, num_classes, l2, init=params,
                                   max_iters=max_iters)
  metrics = common.topk_accuracy(predict_ranks(params, test_x, test_y), ks, num_classes)
  metrics.update({"val_top1": val_top1, "l2": float(l2)})
  return metrics


class LinearProbeEvaluator:
  """Test top-k of a logistic regression fitted on frozen image features (module doc).

  Args (fields of the eval's config; defaults in the signature):
    train_data, test_data: labelled eval data (`eval_data`).
    label: the label field (None: 'label'; for demo train_data 'shape').
    num_classes: None: from the labels seen.
    features: 'embedding' (the normalised image embedding) or 'patch_mean' (the class head's
      input).
    batch_size: global image batch for the features.
    num_train_examples, num_test_examples: the first n of each (None: all; for demo
      train_data 1024 and 512).
    l2_grid, val_fraction, max_iters, seed: the sweep of `linear_probe`.
  """
  needs_text = False

  def __init__(self, config, model, mesh, *, train_data: str = "demo:train",
               test_data: str = "demo:zeroshot", label: str | None = None,
               num_classes: int | None = None, features: str = "embedding",
               batch_size: int = 256, num_train_examples: int | None = None,
               num_test_examples: int | None = None, l2_grid=DEFAULT_L2_GRID,
               val_fraction: float = 0.2, max_iters: int = 1000, seed: int = 0):
    self.config = config
    self.mesh = mesh
    self.train_data = eval_data.parse(train_data, eval_data.LABELS)
    self.test_data = eval_data.parse(test_data, eval_data.LABELS)
    is_demo = self.train_data.kind == "demo"
    if label is None:
      label = "shape" if is_demo else "label"
    self.label = label
    self.num_classes = num_classes
    self.features = features
    if self.features not in FEATURES:
      raise ValueError(f"linear_probe features={self.features!r}: use one of {FEATURES}")
    self.batch_size = int(batch_size)
    demo_counts = (1024, 512) if is_demo else (None, None)
    self.num_train = demo_counts[0] if num_train_examples is None else num_train_examples
    self.num_test = demo_counts[1] if num_test_examples is None else num_test_examples
    self.probe_kwargs = dict(l2_grid=tuple(l2_grid), val_fraction=float(val_fraction),
                             max_iters=int(max_iters), seed=int(seed))
    common.local_batch_size(self.batch_size, mesh)
    use_patch_mean = self.features == "patch_mean"

    def extract(params, batch):
      z, patch_mean = model.apply({"params": params}, batch["image"], method="encode_image")
      x = patch_mean if use_patch_mean else z
      return {"x": x.astype(jnp.float32), "y": batch[label]}

    self._features = common.BatchedFn(extract, mesh, keep=("bad",))

  def _split(self, params, data, num_examples):
    local = common.local_batch_size(self.batch_size, self.mesh)
    ds = eval_data.classification_data(data, self.config, local, num_examples)
    out = self._features(params, ds, self.batch_size)
    return out["x"], out["y"], int(np.sum(out["bad"]))

  def run(self, params) -> dict:
    train_x, train_y, train_bad = self._split(params, self.train_data, self.num_train)
    test_x, test_y, test_bad = self._split(params, self.test_data, self.num_test)
    num_classes = int(self.num_classes or max(train_y.max(), test_y.max()) + 1)
    metrics = linear_probe(train_x, train_y, test_x, test_y, num_classes, **self.probe_kwargs)
    metrics.update({"num_train": float(len(train_x)), "num_test": float(len(test_x)),
                    "num_bad_images": float(train_bad + test_bad),
                    "num_classes": float(num_classes)})
    return metrics

  def chance_levels(self, metrics: dict) -> dict:
    """Test top-1 against a uniform guess over the classes (the run-end summary)."""
    return {"top1": 1.0 / metrics["num_classes"]} if metrics.get("num_classes") else {}
