"""What the sidebar can offer, and the checks on what a user picks. Pure: no streamlit here.

A model is addressed everywhere in the app by one plain string, its *model key*
``"<name>|<device>|<dtype>"`` (for example ``"smollm2-135m|cpu|float32"``). The cached loaders in
:mod:`workbench.app.cached` take that string, so the cache key names the device and dtype too.
``<name>`` is a zoo name, a built-in model name, or a path *relative to the model directory*
(``workbench.paths.models_dir()``); nothing outside that directory can be named.
"""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from workbench import paths, zoo
from workbench.app.compute import encode, encode_no_bos
from workbench.errors import InputError, WorkbenchError

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
    def parse(cls, key: str) -> ModelKey:
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


def zoo_names() -> list[str]:
    """Return the names the model zoo knows: fetched models (ready or not) and built-in checkpoints."""
    return list(zoo.zoo())


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
    entry = zoo.zoo().get(name)
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


def check_name(name: str) -> str:
    """Return ``name`` if it can name a model (printable, at most 200 characters); else raise InputError."""
    bad = [c for c in name if unicodedata.category(c).startswith("C")]
    if bad or len(name) > 200:
        what = f"control character {bad[0]!r}" if bad else f"{len(name)} characters"
        raise InputError(f"model name {name[:60]!r} has {what}; give a zoo name ({', '.join(zoo_names())}) "
                         "or a folder under the model directory")
    return name


def resolve_local(relative: str) -> Path:
    """Return the directory ``relative`` names under the model directory; refuse anything outside it."""
    check_name(relative)
    root = paths.models_dir().resolve()
    if not relative or os.path.isabs(relative) or relative.startswith("~"):
        raise InputError(
            f"model path {relative!r} must be relative to the model directory {root}; "
            "copy or link the checkpoint there and give its folder name"
        )
    target = (root / relative).resolve()
    if target != root and root not in target.parents:
        raise InputError(
            f"model path {relative!r} points outside the model directory {root}; choose a folder inside it"
        )
    if not target.is_dir():
        raise InputError(f"no model folder {relative!r} under {root}; `workbench models` lists what is there")
    return target


def model_source(name: str) -> str | Path:
    """Return what to hand ``load_model`` for ``name``: the zoo name itself, or its folder in the model directory."""
    check_name(name)
    if name in zoo_names():
        return name
    return resolve_local(name)


def model_dir(name: str) -> Path | None:
    """Return the directory holding model ``name``'s checkpoint (and any training snapshots), or None."""
    entry = zoo.zoo().get(name)
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


# ------------------------------------------------------------------------------ per-model defaults


class PromptDefaults(NamedTuple):
    """What the pages open with on one model; every text here tokenizes as its use needs on that model."""

    #: the prompt most pages open with
    text: str
    #: attribution and patching: the clean and corrupted prompts (the same number of tokens) ...
    clean: str
    corrupt: str
    #: ... and the answer and wrong tokens (one token each; token ids for a model without a tokenizer)
    answer: str
    wrong: str


#: the indirect-object task (Wang et al. 2022): the corrupted prompt swaps who gives
IOI = PromptDefaults("When Mary and John went to the store, John gave a drink to",
                     "When Mary and John went to the store, John gave a drink to",
                     "When Mary and John went to the store, Mary gave a drink to", " Mary", " John")
#: the same task in the King James Bible's words (kjv-small's tokenizer splits " Mary"; it reads " Moses")
KJV = PromptDefaults("And when Moses and Aaron went in unto Pharaoh, Aaron spake unto",
                     "And when Moses and Aaron went in unto Pharaoh, Aaron spake unto",
                     "And when Moses and Aaron went in unto Pharaoh, Moses spake unto", " Moses", " Aaron")
#: for models without a tokenizer (the attention-only toys): BOS, then a random sequence twice, whose next
#: token is 17 by induction; the corrupted prompt changes what followed the first 12 to 3
IDS = PromptDefaults("0 17 42 5 33 21 9 50 12 17 42 5 33 21 9 50 12",
                     "0 17 42 5 33 21 9 50 12 17 42 5 33 21 9 50 12",
                     "0 3 42 5 33 21 9 50 12 17 42 5 33 21 9 50 12", "17", "3")

#: models whose own corpus makes other defaults fit better, tried before the general ones
MODEL_DEFAULTS: dict[str, tuple[PromptDefaults, ...]] = {"kjv-small": (KJV,)}


def _fits(model, d: PromptDefaults) -> bool:
    """Whether ``d`` works on ``model``: answers of one token each, clean and corrupted prompts of one length."""
    try:
        if model.tokenizer is None:
            ids = [int(t) for t in (d.clean + " " + d.corrupt + " " + d.answer + " " + d.wrong).split()]
            if any(not 0 <= i < model.cfg.d_vocab for i in ids):
                return False
        if any(len(encode_no_bos(model, w)[0]) != 1 for w in (d.answer, d.wrong)):
            return False
        return len(encode(model, d.clean)[0]) == len(encode(model, d.corrupt)[0]) and bool(encode(model, d.text)[0])
    except (WorkbenchError, ValueError):
        return False


def prompt_defaults(model) -> PromptDefaults:
    """Return the defaults for ``model``: its own (by ``cfg.name``) when they fit, else the first general set
    that fits its tokenizer, else the general set (whose problem the page then names)."""
    if model.tokenizer is None:
        candidates = (*MODEL_DEFAULTS.get(model.cfg.name, ()), IDS)
    else:
        candidates = (*MODEL_DEFAULTS.get(model.cfg.name, ()), IOI, KJV)
    for d in candidates:
        if _fits(model, d):
            return d
    return candidates[-1] if model.tokenizer is None else IOI
