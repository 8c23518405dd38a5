"""tools/loss_gradients (docs/study.md, 'Why'): the two losses' gradients per parameter group,
checked against the train step's own gradient of the total loss and against the losses'
structure (the text tower is contrastive only, the head class only)."""
import numpy as np
import pytest

from superclip_jax.tools import loss_gradients
from tests.test_train import _setup, fixed_batch, tiny_config


@pytest.mark.parametrize("class_weight", [1.0, 0.25])
def test_the_parts_add_up_to_the_train_steps_gradient(class_weight):
  config = tiny_config()
  config.loss.class_weight = class_weight
  factory, step = _setup(config)
  state = factory.create()
  batch = fixed_batch(config)
  result = loss_gradients.loss_gradients(config, state.params, state.idf, [batch])
  assert set(result) == set(state.params)  # every parameter, in some group
  assert result["text"]["class_norm"] == 0 and result["class_head"]["contrastive_norm"] == 0
  assert result["logit_scale"]["class_norm"] == 0
  assert result["visual"]["contrastive_norm"] > 0 and result["visual"]["class_norm"] > 0
  assert -1 <= result["visual"]["cosine"] <= 1
  # |c + h|^2 = |c|^2 + |h|^2 + 2 |c| |h| cos, summed over the groups: the step's grad_norm^2.
  total = sum(r["contrastive_norm"] ** 2 + r["class_norm"] ** 2
              + 2 * r["contrastive_norm"] * r["class_norm"] * r["cosine"]
              for r in result.values())
  _, metrics = step(state, batch)
  np.testing.assert_allclose(np.sqrt(total), float(metrics["grad_norm"]), rtol=1e-4)
  # The weight scales the class gradient and nothing else.
  if class_weight != 1.0:
    config.loss.class_weight = 1.0
    unweighted = loss_gradients.loss_gradients(config, state.params, state.idf, [batch])
    for group, r in result.items():
      np.testing.assert_allclose(r["class_norm"], class_weight * unweighted[group]["class_norm"],
                                 rtol=1e-5)
      np.testing.assert_allclose(r["contrastive_norm"], unweighted[group]["contrastive_norm"],
                                 rtol=1e-6)
