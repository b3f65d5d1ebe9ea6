"""Converter families, one module each, registered by name in :data:`FAMILIES` when imported here.

Adding a family is one module that builds a :class:`Family` and passes it to :func:`register`,
and its name in the import below.
"""
from jaxformers.convert.families.base import (FAMILIES, Family, accepted, config_families, detect, families,
                                              for_export, of_config, register)
from jaxformers.convert.families import bert, roberta, paf, distilbert  # noqa: F401,E402  (each registers its families)

__all__ = ["FAMILIES", "Family", "accepted", "config_families", "detect", "families", "for_export", "of_config",
           "register"]
