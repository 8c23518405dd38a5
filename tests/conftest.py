"""Test-session setup.

PyTorch/torchvision (used by the export tests) segfault when imported after TensorFlow, so
they are imported first, before any test module pulls in tf.data.
"""
try:
  import torch  # noqa: F401
  import torchvision  # noqa: F401
  import open_clip  # noqa: F401
except ImportError:  # the torch extra is optional
  pass
