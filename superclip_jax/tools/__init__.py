"""Command-line tools: `python -m superclip_jax.tools.<name> --help`."""
