"""Baselines and the exact expert, all behind :class:`lambo_ray.experts.base.Expert`.

Each module registers its methods on import; import failures of optional parts are not hidden.
"""

from lambo_ray.experts.base import Expert, available_methods, get_expert, make_decision

__all__ = ["Expert", "available_methods", "get_expert", "make_decision"]

import importlib as _importlib

for _mod in ("heuristics", "exact", "bruteforce", "de", "droo", "are"):
    try:
        _importlib.import_module(f"lambo_ray.experts.{_mod}")
    except ModuleNotFoundError as _err:  # module not written yet during development
        if _err.name != f"lambo_ray.experts.{_mod}":
            raise
