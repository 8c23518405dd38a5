"""The train state — everything a run needs to continue exactly — and its sharded creation.

State lives only here: params, optimizer state, step, RNG, the IDF document counts and the
data position (global examples consumed). The full state never exists on one device: shapes
come from `jax.eval_shape`, and a jitted init writes each array straight into its shards.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from superclip_jax import counts, models, optim, sharding
from superclip_jax.data import position


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 []: optimizer steps taken
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32 [2]: raw key data (checkpoints hold plain arrays)
  idf: counts.IdfCounts  # running document frequencies over every caption seen
  examples_seen: counts.ExactCount  # data position: global examples consumed so far
  # int32 [processes, sources, 2]: each source's next (group, offset) on each process
  # (position.advance_position); file sources resume from it exactly.
  data_position: jax.Array
  # int32 [sources, 2]: the (epoch, item) of each source's global item sequence where the
  # positions count from; moved only when a resume changes the process count
  # (position.resume_position). Zeros in checkpoints written before it existed.
  data_origin: jax.Array


def dummy_inputs(config):
  m = config.model
  return (jnp.zeros((1, m.image_size, m.image_size, 3), jnp.float32),
          jnp.zeros((1, m.context_length), jnp.int32))


def init_params(model: models.SuperCLIP, config, rng):
  return model.init({"params": rng}, *dummy_inputs(config))["params"]


class StateFactory:
  """Builds the model, optimizer and (abstract or real) train state for a config and mesh."""

  def __init__(self, config, mesh):
    self.config = config
    self.mesh = mesh
    self.model = models.model_from_config(config.model)
    abstract_params = jax.eval_shape(lambda r: init_params(self.model, config, r),
                                     jax.random.key(0))
    self.tx, self.schedule = optim.make_optimizer(config, abstract_params)
    self.abstract = jax.eval_shape(self._init, jnp.zeros((2,), jnp.uint32))
    self.shardings = sharding.tree_shardings(config.sharding_rules, self.abstract, mesh)
    # Every host reads the whole table at a restart: keep it replicated whatever the rules.
    self.shardings = self.shardings.replace(data_position=sharding.replicated(mesh),
                                            data_origin=sharding.replicated(mesh))

  def _init(self, rng_data, params=None, idf=None):
    params_rng, train_rng = jax.random.split(jax.random.wrap_key_data(rng_data))
    if params is None:
      params = init_params(self.model, self.config, params_rng)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=self.tx.init(params),
        rng=jax.random.key_data(train_rng),
        idf=counts.IdfCounts.zeros(self.config.model.vocab_size) if idf is None else idf,
        examples_seen=counts.ExactCount.zeros(),
        data_position=jnp.zeros(position.position_shape(self.config), jnp.int32),
        data_origin=jnp.zeros(position.origin_shape(self.config), jnp.int32),
    )

  def _seed_data(self):
    return jax.random.key_data(jax.random.key(self.config.seed))

  def create(self, params=None, idf=None) -> TrainState:
    """A fresh state, sharded over the mesh. `params`: start from these instead of init;
    `idf`: IDF counts {'doc_freq': [vocab], 'num_docs'} (whole numbers) instead of zeros."""
    if params is not None:
      params = jax.device_put(params, self.shardings.params)
    if idf is not None:
      idf = jax.device_put(counts.IdfCounts.from_counts(idf["doc_freq"], idf["num_docs"]),
                           self.shardings.idf)
    return jax.jit(self._init, out_shardings=self.shardings)(self._seed_data(), params, idf)

  def fresh_params(self):
    """The parameters `create()` would initialise, sharded (no optimizer state built)."""
    def init(rng_data):
      params_rng, _ = jax.random.split(jax.random.wrap_key_data(rng_data))
      return init_params(self.model, self.config, params_rng)
    return jax.jit(init, out_shardings=self.shardings.params)(self._seed_data())

  def abstract_with_shardings(self):
    """ShapeDtypeStructs carrying the target shardings (what a restore needs)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        self.abstract, self.shardings)
