"""The multislice mesh: over several TPU slices 'data' crosses slices (DCN) and FSDP stays inside
one, checked on fake TPU devices (the attributes jax's mesh_utils reads) against layouts worked
out here; without slices the mesh is the plain reshape it always was."""
import itertools

import jax
import ml_collections
import numpy as np
import pytest

from superclip_jax import sharding


class FakeTpu:
  platform = "tpu"

  def __init__(self, id, slice_index, coords, device_kind="TPU v4", process_index=0):
    self.id, self.slice_index, self.coords = id, slice_index, coords
    self.device_kind, self.process_index, self.core_on_chip = device_kind, process_index, 0

  def __repr__(self):
    return f"FakeTpu(id={self.id}, slice={self.slice_index}, coords={self.coords})"


def _slices(count, shape, device_kind, shuffle=True):
  """`count` slices of one torus `shape` (x, y, z), 4 chips per host, ids in slice order; the
  list shuffled (as jax.devices() need not list a slice's devices together or in torus order),
  so a plain reshape of it would mix slices and scatter neighbours."""
  devices = []
  for s in range(count):
    for z, y, x in itertools.product(*(range(n) for n in reversed(shape))):
      i = len(devices)
      devices.append(FakeTpu(i, s, (x, y, z), device_kind, process_index=i // 4))
  if shuffle:
    devices = [devices[i] for i in np.random.default_rng(0).permutation(len(devices))]
  return devices


def _mesh(devices, data, fsdp):
  return sharding.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp)), devices)


def test_v4_two_slices():
  devices = _slices(2, (2, 2, 2), "TPU v4")  # 2 x v4-16: 8 chips each, a 2x2x2 torus
  mesh = _mesh(devices, data=4, fsdp=4)
  grid = mesh.devices
  assert mesh.axis_names == ("data", "fsdp") and grid.shape == (4, 4)
  assert sorted(d.id for d in grid.flat) == list(range(16))  # every device once
  # 'data' crosses slices: rows 0-1 are all slice 0, rows 2-3 all slice 1; so every FSDP
  # group (a row) is inside one slice, and every 'data' column has 2 devices in each slice.
  assert [{d.slice_index for d in row} for row in grid] == [{0}, {0}, {1}, {1}]
  for column in grid.T:
    assert sorted(d.slice_index for d in column) == [0, 0, 1, 1]
  # Inside a slice each FSDP group of 4 is a 2x2 face of the 2x2x2 torus (ICI neighbours):
  # one coordinate fixed, the other two taking both values.
  for row in grid:
    distinct = sorted(len({d.coords[a] for d in row}) for a in range(3))
    assert distinct == [1, 2, 2], row


def test_v5e_four_slices_fsdp_is_one_slice():
  devices = _slices(4, (4, 4, 1), "TPU v5 lite")  # 4 x v5litepod-16
  mesh = _mesh(devices, data=-1, fsdp=16)
  assert mesh.devices.shape == (4, 16)
  for s, row in enumerate(mesh.devices):
    assert {d.slice_index for d in row} == {s}
    assert sorted(d.coords for d in row) == sorted((x, y, 0) for x in range(4) for y in range(4))
  # All data-parallel, FSDP 1: 64 rows, each slice a contiguous block of 16.
  mesh = _mesh(devices, data=-1, fsdp=1)
  assert [d.slice_index for d in mesh.devices[:, 0]] == [s for s in range(4) for _ in range(16)]


def test_one_slice_or_no_slices_is_the_plain_reshape():
  one_slice = _slices(1, (2, 2, 2), "TPU v4", shuffle=False)
  expected = np.asarray(one_slice).reshape(2, 4)
  assert (_mesh(one_slice, data=2, fsdp=4).devices == expected).all()
  for d in one_slice:  # devices that have no slice_index at all
    del d.slice_index
  assert (_mesh(one_slice, data=2, fsdp=4).devices == expected).all()
  cpu = jax.devices()
  assert (_mesh(cpu, data=-1, fsdp=1).devices == np.asarray(cpu).reshape(-1, 1)).all()
  assert sharding.slice_count(cpu) == 1


def test_errors_name_the_field():
  devices = _slices(2, (2, 2, 2), "TPU v4")
  with pytest.raises(ValueError, match=r"config\.mesh\.data=1 must be a multiple of the 2 TPU"):
    _mesh(devices, data=1, fsdp=16)
  with pytest.raises(ValueError, match="unequal sizes"):
    _mesh(devices[:12], data=2, fsdp=6)
