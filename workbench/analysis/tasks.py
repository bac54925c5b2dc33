"""Clean/corrupted prompt sets for circuit discovery, generated for any model's tokenizer.

- **IOI** (Wang et al. 2022): "Then, Mary and John went to the store. John gave a drink to" ->
  " Mary" (the indirect object), in ABBA and BABA orders; the corrupted prompt replaces the second
  mention of the subject by a third name (Hanna et al. 2024), so the answer is no longer determined.
  Metric: logit(IO) - logit(S). Names, places and objects are kept only where they are one token.
- **Greater-than** (Hanna et al. 2023): "The war lasted from the year 1732 to the year 17" -> a year
  after 32. Metric: probability of the years (or, for tokenizers that split numbers into digits,
  of the tens digits) above the start year minus those below it. The corrupted prompt starts in
  "01", so every year is above it.
- **A file** of pairs: JSON (a list) or JSONL of ``{"clean", "corrupt", "answer", "wrong"}``.

Every pair has the same token length (positions are patched one to one) and every answer is one
token; anything else is an error that names the pairs or the answers.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from workbench.analysis.patching import LogitDiff, Metric
from workbench.errors import DataError, InputError

if TYPE_CHECKING:
    from workbench.model import HookedGPT


NAMES = (
    "Mary John Alice Bob James Michael David Sarah Emma Tom Anna Paul Mark Lisa Peter Kate Jack Laura "
    "George Helen Daniel Rachel Steven Linda Robert Susan Thomas Karen Richard Nancy Joseph Betty Charles "
    "Emily Kevin Jessica Brian Amy Jason Rose Eric Grace Adam Jane Sam Ben Max Lucy Henry Claire"
).split()
PLACES = "store garden school park house station market office beach hospital restaurant library".split()
OBJECTS = "drink book ring bone kiss apple basketball computer necklace snack letter bottle".split()
IOI_TEMPLATES = (
    "Then, {A} and {B} went to the {PLACE}. {S} gave a {OBJECT} to",
    "When {A} and {B} got a {OBJECT} at the {PLACE}, {S} decided to give it to",
    "After {A} and {B} went to the {PLACE}, {S} gave a {OBJECT} to",
    "While {A} and {B} were working at the {PLACE}, {S} gave a {OBJECT} to",
)
NOUNS = "war expedition project strike war dynasty empire contract occupation voyage siege".split()
GT_TEMPLATE = "The {NOUN} lasted from the year {XX}{YY} to the year {XX}"


@dataclass(frozen=True)
class Task:
    """A batch of clean/corrupted prompt pairs and the metric to read at their last position."""

    name: str
    clean: Int[Tensor, "batch pos"]
    corrupt: Int[Tensor, "batch pos"]
    #: one number per prompt from the last position's logits; sliceable by prompts (``select``)
    metric: Metric
    clean_text: list[str]
    corrupt_text: list[str]


class ProbDiff:
    """Metric: probability of the ``good`` candidate tokens minus that of the ``bad`` ones, per prompt.

    ``candidates`` are token ids with a ``value`` each; a prompt's good ones are those above its
    ``threshold``, the bad ones below (equal: neither)."""

    def __init__(self, candidates: Tensor, values: Tensor, thresholds: Tensor):
        self.candidates, self.values, self.thresholds = candidates.long(), values, thresholds

    def __call__(self, logits: Float[Tensor, "batch d_vocab"]) -> Float[Tensor, " batch"]:
        probs = logits.float().softmax(-1)[:, self.candidates.to(logits.device)]  # [batch candidate]
        thr = self.thresholds.to(logits.device)[:, None]
        vals = self.values.to(logits.device)[None, :]
        sign = (vals > thr).float() - (vals < thr).float()
        return (probs * sign).sum(-1)

    def select(self, rows: slice) -> ProbDiff:
        return ProbDiff(self.candidates, self.values, self.thresholds[rows])


def single_token(model: HookedGPT, text: str) -> int | None:
    """The id of ``text`` if it is exactly one token (without BOS), else None."""
    ids = model.tokenizer.encode(text, add_bos=False)
    return ids[0] if len(ids) == 1 else None


def pair_tokens(model: HookedGPT, clean: list[str], corrupt: list[str]) -> tuple[Tensor, Tensor]:
    """Tokenize prompt pairs into two ``[batch pos]`` tensors; pairs of unequal length, or pairs of
    different lengths from the others, are errors naming them."""
    if len(clean) != len(corrupt) or not clean:
        raise InputError(f"{len(clean)} clean and {len(corrupt)} corrupted prompts; give one corrupted prompt per "
                         "clean one")
    tok = model.tokenizer
    a = [tok.encode(t, add_bos=None) for t in clean]
    b = [tok.encode(t, add_bos=None) for t in corrupt]
    uneven = [i for i, (x, y) in enumerate(zip(a, b)) if len(x) != len(y)]
    if uneven:
        i = uneven[0]
        raise InputError(
            f"{len(uneven)} pair(s) tokenize to different lengths, e.g. pair {i}: clean {clean[i]!r} has {len(a[i])} "
            f"tokens, corrupted {corrupt[i]!r} has {len(b[i])} (pairs {uneven[:10]}); patching pairs positions one "
            "to one, so make each pair the same token length")
    lengths = sorted({len(x) for x in a})
    if len(lengths) > 1:
        by_len = {n: [i for i, x in enumerate(a) if len(x) == n] for n in lengths}
        raise InputError(f"the pairs have different token lengths {by_len if len(a) <= 20 else lengths}; one batch "
                         "needs one length: split the file by length or reword the prompts")
    return torch.tensor(a), torch.tensor(b)


def _uniform(model: HookedGPT, clean: list[str], corrupt: list[str], n: int) -> list[int]:
    """Indices of up to ``n`` generated pairs of equal token length, all of the most common length
    (a tokenizer may merge some names or digits: those pairs are dropped rather than padded)."""
    tok = model.tokenizer
    lengths = [(len(tok.encode(a, add_bos=None)), len(tok.encode(b, add_bos=None))) for a, b in zip(clean, corrupt)]
    even = [la for la, lb in lengths if la == lb]
    if not even:
        raise DataError("no generated pair tokenizes to equal clean and corrupted lengths with this tokenizer; "
                        "give a task file instead (--task FILE)")
    mode = max(set(even), key=even.count)
    return [i for i, (la, lb) in enumerate(lengths) if la == lb == mode][:n]


def _single(model: HookedGPT, words: list[str], prefix: str = " ") -> list[str]:
    return [w for w in words if single_token(model, prefix + w) is not None]


def ioi_task(model: HookedGPT, n: int = 100, seed: int = 0, templates: tuple[str, ...] = IOI_TEMPLATES[:1]) -> Task:
    """``n`` IOI pairs (half ABBA, half BABA) whose names, places and objects are one token each."""
    names, places, objects = _single(model, NAMES), _single(model, PLACES), _single(model, OBJECTS)
    if len(names) < 3 or not places or not objects:
        raise DataError(f"this tokenizer has too few one-token names ({len(names)}), places ({len(places)}) or objects "
                        f"({len(objects)}) for IOI; give a task file instead (--task FILE)")
    rng = random.Random(seed)
    clean, corrupt, io, s = [], [], [], []
    for i in range(4 * n):  # oversampled: pairs of an uncommon token length are dropped
        a, b, c = rng.sample(names, 3)
        fill = dict(PLACE=rng.choice(places), OBJECT=rng.choice(objects))
        template = templates[i % len(templates)]
        first, second = (a, b) if i % 2 == 0 else (b, a)  # ABBA: IO first; BABA: S first
        clean.append(template.format(A=first, B=second, S=b, **fill))
        corrupt.append(template.format(A=first, B=second, S=c, **fill))
        io.append(single_token(model, " " + a))
        s.append(single_token(model, " " + b))
    keep = _uniform(model, clean, corrupt, n)
    clean, corrupt, io, s = ([x[i] for i in keep] for x in (clean, corrupt, io, s))
    ct, rt = pair_tokens(model, clean, corrupt)
    return Task("ioi", ct, rt, LogitDiff(torch.tensor(io), torch.tensor(s)), clean, corrupt)


def greater_than_task(model: HookedGPT, n: int = 100, seed: int = 0) -> Task:
    """``n`` greater-than pairs; two-digit years where they are one token, else the tens digit."""
    two_digit = all(single_token(model, f"{y:02d}") is not None for y in range(100))
    rng = random.Random(seed)
    nouns = _single(model, NOUNS) or NOUNS[:1]
    clean, corrupt, thresholds = [], [], []
    for _ in range(4 * n):  # oversampled, as for IOI
        xx = rng.choice(range(11, 18))
        yy = rng.choice(range(2, 98)) if two_digit else rng.choice(range(2, 8)) * 10 + rng.choice(range(1, 10))
        noun = rng.choice(nouns)
        clean.append(GT_TEMPLATE.format(NOUN=noun, XX=xx, YY=f"{yy:02d}"))
        corrupt.append(GT_TEMPLATE.format(NOUN=noun, XX=xx, YY="01"))
        thresholds.append(yy if two_digit else yy // 10)
    if two_digit:
        values = torch.arange(100)
        cands = torch.tensor([single_token(model, f"{y:02d}") for y in range(100)])
    else:
        digits = [single_token(model, str(d)) for d in range(10)]
        if any(t is None for t in digits):
            raise DataError("this tokenizer has neither one-token two-digit numbers nor one-token digits; the "
                            "greater-than task needs one of them (give a task file instead)")
        values, cands = torch.arange(10), torch.tensor(digits)
    keep = _uniform(model, clean, corrupt, n)
    clean, corrupt, thresholds = ([x[i] for i in keep] for x in (clean, corrupt, thresholds))
    ct, rt = pair_tokens(model, clean, corrupt)
    return Task("greater-than", ct, rt, ProbDiff(cands, values, torch.tensor(thresholds)), clean, corrupt)


def file_task(model: HookedGPT, path: str | Path) -> Task:
    """Pairs from a JSON list or JSONL file of ``{"clean", "corrupt", "answer", "wrong"}``; logit difference."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise DataError(f"cannot read the task file {path}: {e.strerror}") from None
    try:
        if path.suffix == ".json":
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON{'L' if path.suffix != '.json' else ''}: {e}") from None
    keys = ("clean", "corrupt", "answer", "wrong")
    well_formed = isinstance(rows, list) and bool(rows) and all(
        isinstance(r, dict) and all(k in r for k in keys) for r in rows)
    if not well_formed:
        raise DataError(f"{path} must hold a non-empty list of objects with keys {list(keys)}")
    answers = {r[k] for r in rows for k in ("answer", "wrong")}
    ids = {a: single_token(model, a) for a in sorted(answers)}
    bad = [a for a, i in ids.items() if i is None]
    if bad:
        tok = model.tokenizer
        shown = ", ".join(f"{a!r} -> {tok.str_tokens(tok.encode(a, add_bos=False))}" for a in bad[:10])
        raise InputError(f"{len(bad)} answer(s) are not one token in this tokenizer: {shown}; pick answers that are "
                         "(often with a leading space)")
    clean, corrupt = [r["clean"] for r in rows], [r["corrupt"] for r in rows]
    ct, rt = pair_tokens(model, clean, corrupt)
    metric = LogitDiff(torch.tensor([ids[r["answer"]] for r in rows]), torch.tensor([ids[r["wrong"]] for r in rows]))
    return Task(path.stem, ct, rt, metric, clean, corrupt)


def load_task(model: HookedGPT, task: str, n: int = 100, seed: int = 0) -> Task:
    """``ioi``, ``greater-than`` or a path to a task file."""
    if model.tokenizer is None:
        raise InputError("this model has no tokenizer; tasks are text: load it with load_model(...)")
    if task == "ioi":
        return ioi_task(model, n, seed)
    if task == "greater-than":
        return greater_than_task(model, n, seed)
    if Path(task).suffix in (".json", ".jsonl"):
        return file_task(model, task)
    raise InputError(f"unknown task {task!r}: choose ioi, greater-than, or a .json/.jsonl file of pairs")
