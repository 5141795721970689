"""``spec.family`` -> the family object that loads and drives its pipelines.

Family modules import torch and diffusers, so they are imported only when asked for: this module
itself stays importable without torch (the catalog check uses :func:`family_names`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models.families.base import Family

_FAMILY_MODULES: dict[str, str] = {
    "stable_diffusion": "models.families.stable_diffusion",
    "flux": "models.families.flux",
    "wan": "models.families.wan",
    "ltx": "models.families.ltx",
}


def family_names() -> list[str]:
    return sorted(_FAMILY_MODULES)


def register_family(name: str, module: str) -> None:
    """Add a family: ``module`` must define ``FAMILY``, an instance of :class:`Family`."""
    _FAMILY_MODULES[name] = module


def get_family(name: str) -> Family:
    try:
        module = _FAMILY_MODULES[name]
    except KeyError:
        raise KeyError(f"unknown model family {name!r}; known: {', '.join(family_names())}") from None
    return importlib.import_module(module).FAMILY
