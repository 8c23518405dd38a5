"""superclip_jax: SuperCLIP training in JAX/Flax."""
import setuptools

# Tested versions, pinned: the JAX ecosystem's APIs move fast.
CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "chex==0.1.92",
    "ml-collections==1.1.0",
    "absl-py>=2.1",
    "numpy>=1.26",
    # tf.data only (kept off accelerators); the CPU wheel is enough.
    "tensorflow-cpu==2.21.0",
    # Tokenizer: Rust BPE (HF tokenizers) + OpenCLIP's text cleaning.
    "tokenizers==0.23.3",
    "ftfy==6.3.1",
    "regex>=2024.1.1",
    "safetensors==0.8.0",
    "pillow==13.0.0",  # image decoding and OpenCLIP-equal resizing in the input pipeline
    # TensorBoard event files (tf.summary needs the tensorboard package).
    "tensorboard==2.20.0",
]
TEST = ["pytest>=8", "pytest-xdist>=3.5", "tensorflow-datasets==4.9.10"]
# Reading tfds datasets (imported only when a 'tfds:' source is used).
TFDS = ["tensorflow-datasets==4.9.10"]
# PyTorch side: export/import checks against the real libraries.
TORCH = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "open-clip-torch==3.3.0",
    "transformers==5.24.0",
]

setuptools.setup(
    name="superclip_jax",
    version="0.1.0",
    description="SuperCLIP (CLIP + token-classification head) training in JAX/Flax",
    packages=setuptools.find_packages(include=["superclip_jax", "superclip_jax.*"]),
    package_data={"superclip_jax": ["assets/*"]},
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require={"test": TEST, "tfds": TFDS, "torch": TORCH, "all": TEST + TFDS + TORCH},
)
