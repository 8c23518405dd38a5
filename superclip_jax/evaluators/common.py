"""What every evaluator shares: per-host eval data, fixed-shape batches, padding masked out.

How an evaluation flows, on one host or many:
  1. Each process reads its own part of the eval data (the input pipeline's
     `Source.eval_records`, or a contiguous share from `host_slice`), so no example is read
     twice and together the processes read every example.
  2. `BatchedFn` cuts the local examples into batches of `batch_size // process_count` rows,
     pads the last (or, on a process that has run out, an empty) batch with zero rows and a
     validity mask, makes global arrays over the mesh and runs one jitted function at one
     fixed shape. Its outputs come back replicated: every process gets every row.
  3. Padding rows are dropped and the rows are put in one fixed order (process, then position
     within the process; for contiguous shares that is the order of the data). Every example
     is counted exactly once, and the metrics, which do not depend on the order of the
     examples, are the same on one host or many.

Ranks and ties: `rank_of_true` counts the competitors that score at least as high as the true
one, so a tie counts against the model (a model that scores everything equally gets no hit)
and a NaN score is never a hit.

Fields: an evaluator's constructor is `__init__(self, config, model, mesh, *, field=default,
...)`; its keyword-only signature is the list of the fields an eval may set, with their
defaults. `from_config` strips the keys every eval shares (`SHARED_FIELDS`) and calls it.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from superclip_jax import sharding

# Keys `BatchedFn` adds to every batch: validity, position in the process's slice, process.
VALID, POSITION, PROCESS = "_valid", "_position", "_process"
# Keys of an eval's config that `evaluators.build` reads, not the evaluator.
SHARED_FIELDS = ("type", "every_steps")


def fields_of(cls) -> dict:
  """{field: default} of an evaluator class: its constructor's keyword-only parameters."""
  return {p.name: p.default for p in inspect.signature(cls).parameters.values()
          if p.kind == p.KEYWORD_ONLY}


def from_config(cls, eval_config, config, model, mesh):
  """`cls(config, model, mesh, **fields)`: the eval's config without the shared keys.

  A field the constructor does not take is a ValueError naming the evaluator, the field (with
  the closest known one) and every field it knows, instead of a bare TypeError.
  """
  fields = {k: v for k, v in dict(eval_config).items() if k not in SHARED_FIELDS}
  known = fields_of(cls)
  unknown = [k for k in fields if k not in known]
  if unknown:
    named = []
    for k in unknown:
      close = difflib.get_close_matches(k, known, n=1)
      named.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ValueError(f"{cls.__name__} has no field {', '.join(named)}; its fields: "
                     f"{', '.join(known)} (and {', '.join(SHARED_FIELDS)})")
  return cls(config, model, mesh, **fields)


def host_slice(num_examples: int, process_index: int | None = None,
               process_count: int | None = None) -> tuple[int, int]:
  """[start, stop) of this process's contiguous share of `num_examples` (sizes differ by <= 1)."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  base, extra = divmod(num_examples, count)
  start = index * base + min(index, extra)
  return start, start + base + (index < extra)


def local_batch_size(batch_size: int, mesh, what: str = "eval batch_size") -> int:
  """Rows each process feeds per step; validates divisibility with a message that helps."""
  if batch_size <= 0 or batch_size % mesh.size or batch_size % jax.process_count():
    raise ValueError(f"{what}={batch_size} must be a positive multiple of the number of "
                     f"devices ({mesh.size}) and of processes ({jax.process_count()})")
  return batch_size // jax.process_count()


def pad_batch(batch: dict, size: int) -> tuple[dict, np.ndarray]:
  """Pads every array's leading dim to `size` with zeros; returns (batch, valid mask [size])."""
  n = len(next(iter(batch.values())))
  if n > size:
    raise ValueError(f"batch of {n} exceeds the local eval batch size {size}")
  valid = np.arange(size) < n
  padded = {k: np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)])
            if n < size else v for k, v in batch.items()}
  return padded, valid


def numpy_batches(data, local_batch: int) -> tuple[Iterator[dict], dict]:
  """(iterator of numpy batches of <= local_batch rows, {key: (row shape, dtype)}).

  `data` is this process's examples: a dict of arrays (all local rows) or a *batched*
  tf.data.Dataset whose batches have at most `local_batch` rows and static row shapes.
  """
  if isinstance(data, dict):
    arrays = {k: np.asarray(v) for k, v in data.items()}
    n = len(next(iter(arrays.values()))) if arrays else 0
    spec = {k: (v.shape[1:], v.dtype) for k, v in arrays.items()}
    return ({k: v[i:i + local_batch] for k, v in arrays.items()}
            for i in range(0, n, local_batch)), spec
  spec = {}
  for k, s in data.element_spec.items():
    if not s.shape[1:].is_fully_defined():
      raise ValueError(f"eval data field {k!r} has a dynamic shape {s.shape}: every field "
                       "but the batch dimension must have a static shape")
    spec[k] = (tuple(s.shape[1:]), s.dtype.as_numpy_dtype)
  return data.as_numpy_iterator(), spec


def to_numpy(x: jax.Array) -> np.ndarray:
  """A replicated (possibly multi-process) array as numpy, from this process's copy."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


def _any_process(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


class BatchedFn:
  """`fn(inputs, batch) -> {name: [rows, ...]}`, jitted once, run over every example once.

  `fn` is pure; `inputs` (params, class embeddings, ...) is passed through as is. Calling
  `BatchedFn(fn, mesh, keep)(inputs, data, batch_size)` returns
  {name: numpy [examples of all processes, ...]} in data order, on every process; `keep`
  names batch fields returned alongside fn's outputs (e.g. 'label').
  """

  def __init__(self, fn: Callable, mesh, keep: Iterable[str] = ()):
    self.mesh = mesh
    keep = (*keep, VALID, POSITION, PROCESS)

    def wrapper(inputs, batch):
      out = dict(fn(inputs, batch))
      out.update({k: batch[k] for k in keep})
      return out

    self._jitted = jax.jit(wrapper, out_shardings=sharding.replicated(mesh))

  def __call__(self, inputs, data, batch_size: int) -> dict[str, np.ndarray]:
    """data: this process's examples (see `numpy_batches`); numeric fields only.

    batch_size: the global batch, a multiple of the device and process counts.
    """
    local = local_batch_size(batch_size, self.mesh)
    batches, spec = numpy_batches(data, local)
    in_sharding = sharding.batch_sharding(self.mesh)
    outputs, pending, position = [], None, 0
    while True:
      batch = next(batches, None)
      if not _any_process(batch is not None):
        break
      if batch is None:  # this process has run out, others have not: an all-padding batch
        batch = {k: np.zeros((0,) + tuple(shape), dtype) for k, (shape, dtype) in spec.items()}
      n = len(next(iter(batch.values())))
      padded, valid = pad_batch(batch, local)
      padded[VALID] = valid
      padded[POSITION] = np.arange(position, position + local, dtype=np.int32)
      padded[PROCESS] = np.full((local,), jax.process_index(), np.int32)
      position += n
      arrays = {k: jax.make_array_from_process_local_data(in_sharding, v)
                for k, v in padded.items()}
      result = self._jitted(inputs, arrays)
      if pending is not None:  # fetch the previous step's results while this one runs
        outputs.append(_fetch(pending))
      pending = result
    if pending is None:
      raise ValueError("the eval data is empty on every process")
    outputs.append(_fetch(pending))
    out = {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}
    valid = out.pop(VALID)
    order = np.lexsort((out.pop(POSITION)[valid], out.pop(PROCESS)[valid]))
    return {k: v[valid][order] for k, v in out.items()}


def _fetch(tree) -> dict:
  return jax.tree.map(to_numpy, tree)


def rank_of_true(scores: jax.Array, true_index: jax.Array) -> jax.Array:
  """[rows, candidates] scores, [rows] index of the right candidate -> [rows] int32 rank.

  rank = how many *other* candidates score at least as high as the right one (0 = top-1).
  Ties and NaNs count against the model: `not (other < true)` holds for an equal or a NaN
  score, and a NaN true score is beaten by every candidate.
  """
  true = jnp.take_along_axis(scores, true_index[:, None], axis=1)
  at_least = ~(scores < true)
  is_true = jnp.arange(scores.shape[1])[None, :] == true_index[:, None]
  return jnp.sum(at_least & ~is_true, axis=1).astype(jnp.int32)


def topk_accuracy(ranks: np.ndarray, ks: Iterable[int], num_classes: int,
                  prefix: str = "") -> dict:
  """{prefix}top{k}: fraction of rows whose rank < k, for each k < num_classes."""
  ranks = np.asarray(ranks)
  return {f"{prefix}top{k}": float(np.mean(ranks < k)) for k in ks
          if k == 1 or k < num_classes}


def l2_normalize(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
