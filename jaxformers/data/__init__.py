"""Data: sources (a registry by ``data.source``), tokenisation, batching and packing for the trainer."""
# Each source module registers itself in jaxformers.data.sources.SOURCES when imported.
from jaxformers.data import embedded, files, glue, tfds  # noqa: F401
