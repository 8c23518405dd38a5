"""Spec string -> source: the one door to the data sources (`spec.py` has the spec grammar,
`core.py` the `Source` API, one file per kind the sources)."""
from __future__ import annotations

import dataclasses

from superclip_jax.data import core, image_folder, shards, tfds_source
from superclip_jax.data.spec import Fields, input_field, mixture, parse_spec


def from_spec(spec: str, fields: Fields = Fields(), *, skip_missing_shards: bool = False,
              data_dir: str | None = None) -> core.Source:
  """The source a spec string names; options in the spec override `fields`. Validates paths
  and fields now (startup), so a wrong name fails before training, with a message naming it."""
  kind, location, options = parse_spec(spec)
  fields = dataclasses.replace(fields, **{k: v for k, v in options.items() if k != "data_dir"})
  if kind == "wds":
    return shards.WebDatasetSource(spec, location, fields, skip_missing_shards)
  if kind == "tfrecord":
    return shards.TFRecordSource(spec, location, fields, skip_missing_shards)
  if kind == "tfds":
    return tfds_source.from_location(spec, location, fields, options.get("data_dir") or data_dir)
  if kind == "folder":
    return image_folder.ImageFolderSource(spec, location, fields)
  raise ValueError(f"data spec {spec!r}: 'demo' is not a file source")


def build_sources(config) -> list[core.Source]:
  """The sources of config.input.data, checked now (paths, fields), in mixture order."""
  fields = Fields(
      image=input_field(config, "image_key"), text=input_field(config, "text_key"),
      long_text=input_field(config, "long_text_key"), label=input_field(config, "label_key"),
      label_templates=tuple(input_field(config, "label_templates")))
  return [from_spec(spec, fields,
                    skip_missing_shards=bool(input_field(config, "skip_missing_shards")),
                    data_dir=input_field(config, "tfds_data_dir") or None)
          for spec, _ in mixture(config.input.data)]
