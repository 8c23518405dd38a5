"""big_vision's two-towers model at a config's sizes: the `--compare=bigvision` run of bench_step.

    python bench/bench_step.py --config=configs/b16.py --batch_per_device=8 --modes=clip \
        --compare=bigvision --bigvision_path=/src/big_vision     # CPU, f32

big_vision (github.com/google-research/big_vision) is not a package: give the path of a
checkout, the folder that holds `big_vision/models/`. Its `utils` module imports TensorFlow
(`tensorflow.io.gfile`) and einops, so this comparison runs where those are installed (our
`[test]` environment), on CPU: it is a check of our step against a well-known JAX CLIP at the
same sizes, not part of the accelerator benchmark.

The two models have the same shapes: image tower (patch size, width, depth, heads, MLP width;
a class token, as `pool_type='tok'`), text tower (width, depth, heads, MLP width, vocabulary,
context), embedding width and a learned temperature, trained with the same softmax
contrastive loss in both directions and optax's AdamW at the config's lr and weight decay.
What differs is each codebase's own: big_vision's text tower attends both ways (no causal
mask) and pools the last token, its GELU is the tanh approximation, its towers have no
pre-LayerNorm (`ln_pre`); ours are OpenCLIP's. Their FLOPs, from XLA's cost analysis of each
compiled step, are printed beside the times so that a reader can see they do the same work.
"""
import os
import sys
import time


def import_two_towers(path: str):
  """big_vision's `two_towers` module from the checkout at `path`; SystemExit saying what to
  do when the path is not a checkout or its imports fail."""
  path = os.path.abspath(os.path.expanduser(path or ""))
  if not os.path.isfile(os.path.join(path, "big_vision", "models", "proj", "image_text",
                                     "two_towers.py")):
    raise SystemExit(
        f"--bigvision_path={path!r} is not a big_vision checkout: expected "
        f"{os.path.join(path, 'big_vision/models/proj/image_text/two_towers.py')}. Clone "
        "https://github.com/google-research/big_vision and pass the clone's folder.")
  if path not in sys.path:
    sys.path.insert(0, path)
  try:
    from big_vision.models.proj.image_text import two_towers  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise SystemExit(
        f"importing big_vision from {path} failed: {e}. Its models import TensorFlow "
        "(tensorflow.io.gfile), einops, scipy and ml_collections: install those "
        "(pip install -e '.[test]' has them) and retry.") from e
  return two_towers


def check(config, path: str):
  """The `two_towers` module, after checking that `config` can be compared (SystemExit if not)."""
  if config.model.dtype != "float32":
    raise SystemExit(f"--compare=bigvision runs in float32 only (big_vision keeps its "
                     f"parameters and activations in float32); the config has "
                     f"model.dtype={config.model.dtype!r}: add --config.model.dtype=float32.")
  return import_two_towers(path)


def model_kwargs(config) -> dict:
  """two_towers.Model's arguments for the sizes of `config.model` (OpenCLIP's, ours)."""
  from superclip_jax import models  # pylint: disable=import-outside-toplevel
  name, patch = models.parse_variant(config.model.variant)
  image, text = models.VIT_SIZES[name], models.TEXT_SIZES[name]
  return dict(
      out_dim=models.EMBED_DIMS[name],
      temperature_init=1 / 0.07,
      image=dict(patch_size=(patch, patch), width=image.width, depth=image.layers,
                 num_heads=image.heads, mlp_dim=int(image.width * image.mlp_ratio),
                 pool_type="tok", posemb="learn", head_zeroinit=False),
      text=dict(width=text.width, depth=text.layers, num_heads=text.heads,
                mlp_dim=int(text.width * text.mlp_ratio), vocab_size=49408,
                pool_type="last"))


def make_step(model, tx):
  """(state, batch) -> (state, metrics): the softmax contrastive loss in both directions."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  def loss_fn(params, batch):
    zimg, ztxt, out = model.apply({"params": params}, batch["image"], batch["tokens"])
    logits = zimg @ ztxt.T * out["t"]
    labels = jnp.arange(logits.shape[0])
    ce = optax.softmax_cross_entropy_with_integer_labels
    return (ce(logits, labels).mean() + ce(logits.T, labels).mean()) / 2

  def step(state, batch):
    params, opt_state = state
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), {"loss": loss}

  return step


def prepare(config, batch: dict, two_towers) -> dict:
  """A bench_step run (compiled step, state, batch, compile seconds, FLOPs) of big_vision's
  two-towers model (`two_towers`, from `check`) at `config`'s sizes, on the device batch
  `batch` (image, tokens)."""
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from superclip_jax import mfu  # pylint: disable=import-outside-toplevel
  model = two_towers.Model(**model_kwargs(config))
  batch = {"image": batch["image"], "tokens": batch["tokens"]}
  params = jax.jit(model.init)(jax.random.PRNGKey(0), batch["image"][:1],
                               batch["tokens"][:1])["params"]
  tx = optax.adamw(config.lr, weight_decay=config.wd)
  state = (params, tx.init(params))
  step = jax.jit(make_step(model, tx), donate_argnums=0)
  start = time.perf_counter()
  lowered = step.lower(state, batch)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  return {"mode": "big_vision", "attention": "its own", "step": compiled, "state": state,
          "batch": batch, "compile_s": compile_s,
          "flops": mfu.cost_flops(lowered.cost_analysis()), "times": [],
          "params": sum(x.size for x in jax.tree_util.tree_leaves(params))}
