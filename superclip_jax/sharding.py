"""The device mesh and where every array lives on it.

The mesh has two axes, 'data' and 'fsdp'; the batch is split over both (over several TPU slices,
'data' is the axis that crosses slices: `multislice_device_array`). Parameters and
optimizer state are placed by `config.sharding_rules` (regex over parameter names, first match
wins):
  'replicate'            a full copy on every device
  'fsdp'                 split along the largest dimension divisible by the 'fsdp' axis size
                         (replicated when no dimension divides); never the leading [layers]
                         axis of scan_layers parameters, which the scan slices one layer at a
                         time (split, XLA would gather the whole stack onto every device)
"""
from __future__ import annotations

import collections
import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from superclip_jax import param_rules, scan_layout

BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_config, devices=None) -> Mesh:
  """Mesh('data', 'fsdp') from config sizes; one size may be -1 (all remaining devices)."""
  devices = jax.devices() if devices is None else devices
  n = len(devices)
  sizes = [int(mesh_config.data), int(mesh_config.fsdp)]
  if sizes.count(-1) > 1:
    raise ValueError("config.mesh: at most one of data/fsdp may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n % known:
      raise ValueError(f"config.mesh {dict(mesh_config)} does not fit {n} devices")
    sizes[sizes.index(-1)] = n // known
  if math.prod(sizes) != n:
    raise ValueError(f"config.mesh data={sizes[0]} x fsdp={sizes[1]} = {math.prod(sizes)} "
                     f"devices, but {n} are available; use -1 for one axis to fill")
  if slice_count(devices) > 1:
    return Mesh(multislice_device_array(sizes, devices), BATCH_AXES)
  return Mesh(np.asarray(devices).reshape(sizes), BATCH_AXES)


def slice_count(devices) -> int:
  """How many Cloud TPU slices (multislice) `devices` span; 1 off TPU or without slice_index."""
  if not devices or getattr(devices[0], "platform", None) != "tpu":
    return 1
  return len({getattr(d, "slice_index", 0) for d in devices})


def multislice_device_array(sizes, devices) -> np.ndarray:
  """[data, fsdp] devices over several TPU slices: 'data' is split across the slices (their
  gradients meet over the slower data-centre network, DCN, once a step) and everything else
  stays inside a slice on its fast interconnect (ICI): each slice holds `data / slices` whole
  rows, laid out by `mesh_utils` for its torus."""
  data, fsdp = sizes
  per_slice = collections.Counter(getattr(d, "slice_index", 0) for d in devices)
  slices = len(per_slice)
  if len(set(per_slice.values())) != 1:
    raise ValueError(f"The devices span {slices} TPU slices of unequal sizes "
                     f"{dict(sorted(per_slice.items()))} (slice_index: devices); a multislice "
                     "run needs slices of one accelerator type")
  if data % slices:
    raise ValueError(
        f"config.mesh.data={data} must be a multiple of the {slices} TPU slices the devices "
        "span: 'data' is the axis split across slices (over the data-centre network; FSDP "
        f"stays inside a slice); e.g. --config.mesh.data={slices} --config.mesh.fsdp=-1")
  return mesh_utils.create_hybrid_device_mesh(
      (data // slices, fsdp), (slices, 1), devices, allow_split_physical_axes=True)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch(global_batch: int, mesh: Mesh, accum_steps: int = 1) -> None:
  """The global batch, and each of its `accum_steps` micro-batches, must split over the mesh."""
  if global_batch % mesh.size:
    fit = global_batch // mesh.size * mesh.size or mesh.size
    raise ValueError(f"input.batch_size={global_batch} must be divisible by the number of "
                     f"devices ({mesh.size}); e.g. {fit}")
  if accum_steps > 1:  # (batch_size % accum_steps: config_lib.validate)
    micro = global_batch // accum_steps
    if micro % mesh.size:
      raise ValueError(
          f"input.batch_size / accum_steps = {global_batch} / {accum_steps} = {micro} (the "
          f"micro-batch) must be divisible by the number of devices ({mesh.size}): every "
          f"micro-batch is spread over all of them; lower accum_steps or make input.batch_size "
          f"a multiple of {accum_steps * mesh.size}")


def _spec(rule: str, shape, fsdp_size: int, stacked: bool = False) -> P:
  if rule == "replicate":
    return P()
  if rule == "fsdp":
    dims = sorted(range(int(stacked), len(shape)), key=lambda d: -shape[d])
    for d in dims:
      if shape[d] % fsdp_size == 0 and shape[d] >= fsdp_size:
        spec = [None] * len(shape)
        spec[d] = "fsdp"
        return P(*spec)
    return P()
  raise ValueError(f"Unknown sharding rule {rule!r}: use 'replicate' or 'fsdp'")


def tree_shardings(rules, tree, mesh: Mesh):
  """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs) by name rules.

  Leaves without a parameter-like name (optimizer counters, scalars) are replicated.
  """
  fsdp_size = mesh.shape["fsdp"]
  chosen = param_rules.tree_match(rules, tree, default="replicate", what="sharding rule")
  names = param_rules.tree_names(tree)
  return jax.tree.map(
      lambda r, n, x: NamedSharding(mesh, _spec(r, np.shape(x), fsdp_size,
                                                scan_layout.is_stacked(n))), chosen, names, tree)
