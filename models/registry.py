"""``spec.family`` -> the family object that loads and drives its pipelines.

A family is one module in ``models/families/`` defining ``FAMILY`` (a
:class:`models.families.base.Family`); the module name is the family name used in specs, so a new
family is one new file. :func:`register_family` adds one that lives elsewhere. Family modules
import torch and diffusers, so they are imported only when asked for: this module stays
importable without torch (the catalog check uses :func:`family_names`).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

from models import families

if TYPE_CHECKING:
    from models.families.base import Family

_NOT_FAMILIES = {"base"}
_EXTRA: dict[str, str] = {}


def _builtin() -> dict[str, str]:
    return {m.name: f"{families.__name__}.{m.name}" for m in pkgutil.iter_modules(families.__path__)
            if m.name not in _NOT_FAMILIES and not m.name.startswith("_")}


def family_names() -> list[str]:
    return sorted({**_builtin(), **_EXTRA})


def register_family(name: str, module: str) -> None:
    """Add a family whose module lives outside ``models/families`` (it must define ``FAMILY``)."""
    _EXTRA[name] = module


def get_family(name: str) -> Family:
    module = {**_builtin(), **_EXTRA}.get(name)
    if module is None:
        raise KeyError(f"unknown model family {name!r}; known: {', '.join(family_names())}")
    family: Family = importlib.import_module(module).FAMILY
    return family
