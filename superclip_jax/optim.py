"""The optimizer: AdamW with warmup + cosine, regex weight-decay multipliers, frozen groups."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from superclip_jax import param_rules, scan_layout


def make_schedule(config):
  """OpenCLIP's schedule: lr * (step + 1) / warmup during warmup, then cosine (or linear, or
  constant) decay over the remaining steps to 0 — step 0 already trains."""
  total, lr = config.total_steps, config.lr
  warmup = min(config.schedule.warmup_steps, total)
  kind = config.schedule.decay_type
  if kind not in ("cosine", "linear", "constant"):
    raise ValueError(f"schedule.decay_type must be 'cosine', 'linear' or 'constant', got {kind!r}")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    frac = jnp.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
    decayed = {"cosine": 0.5 * (1.0 + jnp.cos(jnp.pi * frac)) * lr,
               "linear": (1.0 - frac) * lr, "constant": lr + 0.0 * frac}[kind]
    return jnp.where(step < warmup, lr * (step + 1) / max(warmup, 1), decayed)
  return schedule


def weight_decay_mask(config, params):
  """Tree of wd multipliers: `config.wd_mults` rules, and never any tensor with ndim < 2.

  The default rules reproduce the official exemption (names containing ln / bn / bias /
  logit_scale), see configs. The ndim is per layer: a scan_layers parameter's leading [layers]
  axis does not count, so the mask is the unscanned model's, stacked.
  """
  mults = param_rules.tree_match(config.wd_mults, params, what="wd_mults rule")
  names = param_rules.tree_names(params)

  def mult(m, name, p):
    return float(m) if jnp.ndim(p) - scan_layout.is_stacked(name) >= 2 else 0.0
  return jax.tree.map(mult, mults, names, params)


def make_optimizer(config, params):
  """Returns (optax transform, lr schedule). `params` may be abstract (ShapeDtypeStructs)."""
  schedule = make_schedule(config)
  mults = weight_decay_mask(config, params)
  o = config.optax
  chain = []
  if config.get("grad_clip_norm"):
    chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
  chain += [
      optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps),
      _add_scaled_decay(config.wd, mults),  # decoupled, as torch.optim.AdamW
      optax.scale_by_learning_rate(schedule),
  ]
  tx = optax.chain(*chain)
  frozen = param_rules.matches_any(config.get("frozen", ()), params)
  if any(jax.tree.leaves(frozen)):
    labels = jax.tree.map(lambda f: "frozen" if f else "train", frozen)
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule


def _add_scaled_decay(wd, mults):
  """updates + wd * mult * params, with a per-parameter multiplier (0 = no decay)."""
  def decay(m, u, p):
    # Frozen leaves arrive as optax MaskedNodes under multi_transform: leave them be.
    return u + wd * m * p if m and not isinstance(u, optax.MaskedNode) else u

  def update_fn(updates, state, params):
    updates = jax.tree.map(decay, mults, updates, params)
    return updates, state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def clamp_logit_scale(params, max_value=math.log(100.0)):
  """OpenCLIP clamps the (log) logit scale to [0, ln 100] after every optimizer step."""
  if "logit_scale" not in params:
    return params
  return {**params, "logit_scale": jnp.clip(params["logit_scale"], 0.0, max_value)}
