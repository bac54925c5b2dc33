"""What the sidebar can offer, and the checks on what a user picks. Pure: no streamlit here.

A model is addressed everywhere in the app by one plain string, its *model key*
``"<name>|<device>|<dtype>"`` (for example ``"smollm2-135m|cpu|float32"``). The cached loaders in
:mod:`workbench.app.cached` take that string, so the cache key names the device and dtype too.
``<name>`` is a zoo name, a built-in model name, or a path *relative to the model directory*
(``workbench.paths.models_dir()``); nothing outside that directory can be named.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from workbench import paths
from workbench.errors import InputError

#: The model the app opens with when nothing else is asked for.
DEFAULT_MODEL = "smollm2-135m"
#: Environment variable (and query parameter ``model``) that picks the model at start-up.
MODEL_ENV = "WORKBENCH_APP_MODEL"
#: The longest prompt (in tokens) any page runs; longer prompts are cut with a message.
MAX_PROMPT_TOKENS = 128

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelKey:
    """A model, the device it runs on and the dtype of its weights."""

    name: str
    device: str = "cpu"
    dtype: str = "float32"

    def __str__(self) -> str:
        return f"{self.name}|{self.device}|{self.dtype}"

    @classmethod
    def parse(cls, key: str) -> "ModelKey":
        parts = key.split("|")
        if len(parts) != 3 or not all(parts):
            raise InputError(f"model key {key!r} is not of the form 'name|device|dtype'")
        name, device, dtype = parts
        if dtype not in DTYPES:
            raise InputError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        return cls(name, device, dtype)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def devices() -> list[str]:
    """Return the devices this machine offers, CPU first."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" if torch.cuda.device_count() > 1 else "cuda" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


def dtypes_for(device: str) -> list[str]:
    """Return the weight dtypes worth offering on ``device`` (half precision is slow on CPUs)."""
    return ["float32", "bfloat16"] if device == "cpu" else ["float32", "bfloat16", "float16"]


def _zoo():
    try:
        from workbench import zoo
    except ImportError:  # the zoo module has not landed; local checkpoints still work
        return None
    return zoo


def zoo_names() -> list[str]:
    """Return the names the model zoo knows: fetched models (ready or not) and built-in checkpoints."""
    zoo = _zoo()
    return list(zoo.zoo()) if zoo is not None else [DEFAULT_MODEL]


def local_names() -> list[str]:
    """Return native checkpoints under the model directory, as paths relative to it."""
    root = paths.models_dir()
    found = []
    for cfg in sorted(root.glob("*/config.json")) + sorted(root.glob("*/*/config.json")):
        found.append(cfg.parent.relative_to(root).as_posix())
    return found


def model_names() -> list[str]:
    """Return every model the sidebar offers: the zoo, then local checkpoints (no repeats)."""
    seen: dict[str, None] = {}
    for name in [*zoo_names(), *local_names()]:
        seen.setdefault(name, None)
    return list(seen)


def missing_message(name: str) -> str | None:
    """Return what to run when zoo model ``name`` is not on this machine yet (None when it is ready)."""
    zoo = _zoo()
    if zoo is None:
        return f"The model zoo is not installed in this checkout, so {name!r} cannot be loaded."
    entry = zoo.zoo().get(name)
    if entry is None or entry.kind == "builtin":
        return None
    status = zoo.cache_status(name)
    if status.state == "ready":
        return None
    return (
        f"{name} is not on this machine yet ({status.detail}). Fetch and convert it once with\n\n"
        f"    workbench fetch {name}\n\n(or `make fetch`), then reload this page. "
        "Meanwhile the built-in models in the sidebar work without fetching anything."
    )


def model_card(name: str) -> str:
    """Return the model's card (markdown): its card.md when it has one, else the zoo's description."""
    zoo = _zoo()
    entry = zoo.zoo().get(name) if zoo is not None else None
    dirs = []
    if entry is not None:
        dirs.append(entry.directory if entry.directory is not None else zoo.cache_dir(name))
    else:
        try:
            dirs.append(resolve_local(name))
        except InputError:
            pass
    for d in dirs:
        if d is not None and (d / "card.md").is_file():
            return (d / "card.md").read_text(errors="replace")
    return f"**{name}**: {entry.description}" if entry is not None else f"**{name}**: a local checkpoint (no card.md)"


def resolve_local(relative: str) -> Path:
    """Return the directory ``relative`` names under the model directory; refuse anything outside it."""
    root = paths.models_dir().resolve()
    if not relative or os.path.isabs(relative) or relative.startswith("~"):
        raise InputError(
            f"model path {relative!r} must be relative to the model directory {root}; "
            "copy or link the checkpoint there and give its folder name"
        )
    target = (root / relative).resolve()
    if target != root and root not in target.parents:
        raise InputError(f"model path {relative!r} points outside the model directory {root}; choose a folder inside it")
    if not target.is_dir():
        raise InputError(f"no model folder {relative!r} under {root}; `workbench models` lists what is there")
    return target


def model_source(name: str) -> str | Path:
    """Return what to hand ``load_model`` for ``name``: the zoo name itself, or its folder in the model directory."""
    if name in zoo_names():
        return name
    return resolve_local(name)


def model_dir(name: str) -> Path | None:
    """Return the directory holding model ``name``'s checkpoint (and any training snapshots), or None."""
    zoo = _zoo()
    entry = zoo.zoo().get(name) if zoo is not None else None
    if entry is not None:
        d = entry.directory if entry.directory is not None else zoo.cache_dir(name)
        return d if d is not None and d.is_dir() else None
    try:
        return resolve_local(name)
    except InputError:
        return None


def default_model(query_value: str | None = None) -> str:
    """Return the start-up model: the ``model`` query parameter, else ``$WORKBENCH_APP_MODEL``, else SmolLM2."""
    return query_value or os.environ.get(MODEL_ENV) or DEFAULT_MODEL
