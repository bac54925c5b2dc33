"""Interpretability workbench: a hook-instrumented GPT and the analyses built on it.

    from workbench import GPTConfig, HookedGPT, load_model
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Lazy attributes keep `import workbench` cheap (the CLI and the app import only what they use).
_LAZY = {
    "GPTConfig": "workbench.model",
    "HookedGPT": "workbench.model",
    "parameter_counts": "workbench.model",
    "ActivationCache": "workbench.cache",
    "Batch": "workbench.padding",
    "Tokenizer": "workbench.tokenize",
    "load_model": "workbench.zoo",
}

# For type checkers only; at run time __getattr__ serves these. ruff cannot see `__all__ = sorted(_LAZY)`,
# hence the noqa (F401: re-exported, not unused).
if TYPE_CHECKING:  # pragma: no cover
    from workbench.cache import ActivationCache  # noqa: F401
    from workbench.model import GPTConfig, HookedGPT, parameter_counts  # noqa: F401
    from workbench.padding import Batch  # noqa: F401
    from workbench.tokenize import Tokenizer  # noqa: F401
    from workbench.zoo import load_model  # noqa: F401


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")


__all__ = sorted(_LAZY)
