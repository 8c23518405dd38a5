"""Training and evaluation data: sources, transforms, the tf.data pipeline (docs/data.md)."""
