"""Datasets for linear probes: labelled texts with the token position to read stated.

    ds = truth_dataset(seed=0)                                  # true/false statements the workbench writes
    ds = load_probe_dataset("reviews.csv", position="last")      # a user file of text,label rows
    ds = load_probe_dataset("marked.jsonl", position="<<>>")     # read the token just before the marker
    reads = read_positions(model, ds)                            # token ids and the position of each text

Generated facts (Marks & Tegmark 2023, "The Geometry of Truth", use the same three kinds): capitals
of countries ("The capital of France is Paris." / "... is Rome."), sums ("3 + 4 = 7." / "= 9.") and
comparisons of two numbers ("17 is larger than 5." / "smaller"). Each fact appears with its true and
a false answer, so the answer word alone never tells the label. Statements end with a period, and
by default the probe reads the period: the position where the whole statement has been seen.

A *position* is ``"last"`` (the last token of the text) or a marker string. A marker is removed from
the text before tokenizing, and the probe reads the token that ends just before it ("The capital of
France is Paris<<>>." reads " Paris").
"""

from __future__ import annotations

import csv
import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from workbench.errors import DataError, InputError

#: the fewest examples of each class a probe is trained on (a held-out split of fewer says nothing)
MIN_PER_CLASS = 10
#: spellings a label may take in a user file (case-insensitive); anything else is an error
LABEL_WORDS = {"1": 1, "0": 0, "true": 1, "false": 0, "yes": 1, "no": 0}
Family = Literal["capitals", "arithmetic", "comparisons"]
FAMILIES: tuple[Family, ...] = ("capitals", "arithmetic", "comparisons")


@dataclass(frozen=True)
class ProbeDataset:
    """Texts with a binary label each, and where in each text the probe reads."""

    #: the texts, markers still in them when ``position`` is a marker
    texts: list[str]
    #: 0 or 1 per text
    labels: list[int]
    #: ``"last"`` (the last token) or a marker string whose preceding token is read
    position: str = "last"
    #: what label 0 and label 1 mean, for tables and plots
    label_names: tuple[str, str] = ("0", "1")
    #: a name for reports
    name: str = "dataset"
    #: per text, the family or source it came from ("" when there is one)
    groups: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def counts(self) -> tuple[int, int]:
        """Return how many texts have label 0 and label 1."""
        c = Counter(self.labels)
        return c.get(0, 0), c.get(1, 0)

    def subset(self, index: list[int]) -> ProbeDataset:
        """Return the texts at ``index`` (same position, names and group labels)."""
        groups = [self.groups[i] for i in index] if self.groups else []
        return ProbeDataset([self.texts[i] for i in index], [self.labels[i] for i in index], self.position,
                            self.label_names, self.name, groups)

    def check(self, min_per_class: int = MIN_PER_CLASS) -> ProbeDataset:
        """Return the dataset after checking that it can train a probe: both classes, enough of each."""
        if len(self.texts) != len(self.labels):
            raise DataError(f"{self.name}: {len(self.texts)} texts but {len(self.labels)} labels")
        bad = sorted({lbl for lbl in self.labels if lbl not in (0, 1)})
        if bad:
            raise DataError(f"{self.name}: labels must be 0 or 1, found {bad[:5]}")
        n0, n1 = self.counts()
        if n0 == 0 or n1 == 0:
            only = self.label_names[1] if n0 == 0 else self.label_names[0]
            raise DataError(f"{self.name}: every one of the {len(self.texts)} examples has label {only!r}; a probe "
                            "separates two classes, so give examples of both")
        if min(n0, n1) < min_per_class:
            raise DataError(f"{self.name}: {n0} examples of {self.label_names[0]!r} and {n1} of "
                            f"{self.label_names[1]!r}; a probe needs at least {min_per_class} of each class "
                            "(held-out accuracy on fewer says nothing)")
        if self.position != "last":
            missing = [i for i, t in enumerate(self.texts) if self.position not in t]
            if missing:
                raise DataError(f"{self.name}: the position marker {self.position!r} is absent from {len(missing)} "
                                f"text(s), e.g. line {missing[0] + 1}: {self.texts[missing[0]][:60]!r}; put the "
                                "marker right after the token to read in every text, or use position='last'")
        return self


# ------------------------------------------------------------------------------- generated statements

#: (country, capital): well-known pairs, each capital a different city
CAPITALS: tuple[tuple[str, str], ...] = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("England", "London"), ("Ireland", "Dublin"), ("Russia", "Moscow"), ("Japan", "Tokyo"), ("China", "Beijing"),
    ("Egypt", "Cairo"), ("Greece", "Athens"), ("Austria", "Vienna"), ("Hungary", "Budapest"), ("Poland", "Warsaw"),
    ("Sweden", "Stockholm"), ("Norway", "Oslo"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
    ("Belgium", "Brussels"), ("the Netherlands", "Amsterdam"), ("Switzerland", "Bern"), ("Turkey", "Ankara"),
    ("India", "New Delhi"), ("Thailand", "Bangkok"), ("South Korea", "Seoul"), ("Kenya", "Nairobi"),
    ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Mexico", "Mexico City"),
    ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Cuba", "Havana"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
    ("Ukraine", "Kyiv"), ("the Czech Republic", "Prague"), ("Romania", "Bucharest"), ("Bulgaria", "Sofia"),
    ("Serbia", "Belgrade"), ("Croatia", "Zagreb"), ("Scotland", "Edinburgh"), ("Wales", "Cardiff"),
    ("Colombia", "Bogota"), ("Venezuela", "Caracas"), ("the Philippines", "Manila"), ("Vietnam", "Hanoi"),
    ("Indonesia", "Jakarta"), ("Saudi Arabia", "Riyadh"), ("Pakistan", "Islamabad"), ("Afghanistan", "Kabul"),
    ("Syria", "Damascus"), ("Lebanon", "Beirut"), ("Israel", "Jerusalem"), ("Jordan", "Amman"),
    ("Ethiopia", "Addis Ababa"), ("Nigeria", "Abuja"), ("Ghana", "Accra"), ("Morocco", "Rabat"),
    ("Tunisia", "Tunis"), ("Algeria", "Algiers"), ("Uganda", "Kampala"), ("Iceland", "Reykjavik"),
    ("Estonia", "Tallinn"), ("Latvia", "Riga"), ("Lithuania", "Vilnius"), ("Slovakia", "Bratislava"),
    ("Slovenia", "Ljubljana"), ("Albania", "Tirana"), ("Nepal", "Kathmandu"), ("Bangladesh", "Dhaka"),
    ("Malaysia", "Kuala Lumpur"), ("Singapore", "Singapore"), ("New Zealand", "Wellington"),
    ("Uruguay", "Montevideo"), ("Paraguay", "Asuncion"), ("Bolivia", "La Paz"), ("Ecuador", "Quito"),
    ("Jamaica", "Kingston"),
)
_CAPITAL_TEMPLATES = ("The capital of {c} is {x}.", "{x} is the capital of {c}.", "The capital city of {c} is {x}.")
_COMPARE_WORDS = (("larger", "smaller"), ("bigger", "less"), ("greater", "smaller"))


def capital_statements(seed: int = 0, templates: int = len(_CAPITAL_TEMPLATES),
                       pairs: Sequence[tuple[str, str]] = CAPITALS) -> ProbeDataset:
    """Return each country's true capital statement and one with another country's capital, in each template."""
    rng = random.Random(seed)
    texts, labels = [], []
    cities = [city for _, city in pairs]
    for template in _CAPITAL_TEMPLATES[:templates]:
        for country, city in pairs:
            wrong = rng.choice([c for c in cities if c != city])
            for answer, label in ((city, 1), (wrong, 0)):
                texts.append(template.format(c=country, x=answer))
                labels.append(label)
    return ProbeDataset(texts, labels, "last", ("false", "true"), "capitals", ["capitals"] * len(texts))


def known_capitals(model, pairs: Sequence[tuple[str, str]] = CAPITALS) -> list[tuple[str, str]]:
    """Return the (country, capital) pairs the model knows: after "The capital of {country} is", the capital's
    first token has the highest logit among the first tokens of all the capitals (the "known facts" filter of
    Meng et al. 2022: a probe cannot read the truth of a fact the model does not hold)."""
    tok = model._require_tokenizer()
    first = [tok.encode(" " + city, add_bos=False)[0] for _, city in pairs]
    known = []
    with torch.inference_mode():
        for (country, city), answer in zip(pairs, first):
            logits = model(model.to_tokens(f"The capital of {country} is"))[0, -1]
            if int(torch.tensor(first)[logits[first].argmax()]) == answer:
                known.append((country, city))
    return known


def arithmetic_statements(n: int = 150, seed: int = 0, high: int = 20) -> ProbeDataset:
    """Return ``n`` sums ``a + b = c.`` of numbers below ``high``, half of them with c off by 1 to 3."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        a, b = rng.randrange(high), rng.randrange(high)
        label = i % 2
        c = a + b if label else a + b + rng.choice((-3, -2, -1, 1, 2, 3))
        if c < 0:
            c = a + b + rng.choice((1, 2, 3))
        texts.append(f"{a} + {b} = {c}.")
        labels.append(label)
    return ProbeDataset(texts, labels, "last", ("false", "true"), "arithmetic", ["arithmetic"] * n)


def comparison_statements(n: int = 150, seed: int = 0, high: int = 100) -> ProbeDataset:
    """Return ``n`` statements "x is larger/smaller than y." about distinct numbers below ``high``, half true."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        x, y = rng.sample(range(high), 2)
        bigger, smaller = rng.choice(_COMPARE_WORDS)
        label = i % 2
        says_bigger = (x > y) == bool(label)
        texts.append(f"{x} is {bigger if says_bigger else smaller} than {y}.")
        labels.append(label)
    return ProbeDataset(texts, labels, "last", ("false", "true"), "comparisons", ["comparisons"] * n)


_SENTIMENT_SUBJECTS = ("The movie", "The food", "The hotel", "The concert", "The book", "The service", "Our trip",
                       "The game", "The show", "The weather", "The party", "The meal", "The new phone", "The class",
                       "The museum", "The flight")
_POSITIVE = ("wonderful", "excellent", "great", "amazing", "delightful", "fantastic", "lovely", "superb")
_NEGATIVE = ("terrible", "awful", "horrible", "dreadful", "disappointing", "bad", "miserable", "boring")


def sentiment_statements(seed: int = 0) -> ProbeDataset:
    """Return short verdicts ("The movie was wonderful.") of every subject with a positive and a negative word
    (label 1: positive): a contrast set for steering, read at the period."""
    rng = random.Random(seed)
    texts, labels = [], []
    for subject in _SENTIMENT_SUBJECTS:
        for label, words in ((1, _POSITIVE), (0, _NEGATIVE)):
            for word in rng.sample(words, 4):
                texts.append(f"{subject} was {word}.")
                labels.append(label)
    return ProbeDataset(texts, labels, "last", ("negative", "positive"), "sentiment", ["sentiment"] * len(texts))


def truth_dataset(families: tuple[Family, ...] = FAMILIES, n_per_family: int = 150, seed: int = 0,
                  capitals: Sequence[tuple[str, str]] = CAPITALS) -> ProbeDataset:
    """Return true/false statements of the chosen families, shuffled together (label 1: true); ``capitals``: the
    (country, capital) pairs to state (e.g. :func:`known_capitals` of a model)."""
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise InputError(f"unknown statement families {unknown or 'none given'}; choose from {list(FAMILIES)}")
    parts = []
    for fam in families:
        if fam == "capitals":
            parts.append(capital_statements(seed, pairs=capitals))
        elif fam == "arithmetic":
            parts.append(arithmetic_statements(n_per_family, seed))
        else:
            parts.append(comparison_statements(n_per_family, seed))
    rows = [(t, lbl, g) for p in parts for t, lbl, g in zip(p.texts, p.labels, p.groups)]
    random.Random(seed).shuffle(rows)
    texts, labels, groups = (list(x) for x in zip(*rows))
    return ProbeDataset(texts, labels, "last", ("false", "true"), "truth:" + "+".join(families), groups)


# ---------------------------------------------------------------------------------------- user files


def parse_label(value: object, where: str) -> int:
    """Return 0 or 1 for a label as a file spells it (0/1, true/false, yes/no); anything else is a DataError."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    word = str(value).strip().lower()
    if word in LABEL_WORDS:
        return LABEL_WORDS[word]
    raise DataError(f"{where}: label {value!r} does not parse; write 0/1, true/false or yes/no")


def load_probe_dataset(path: str | Path, position: str = "last", text_column: str = "text",
                       label_column: str = "label") -> ProbeDataset:
    """Return the labelled texts of a CSV (with a header row) or JSONL file, checked for probing."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no dataset file at {path}; give a .csv (header text,label) or .jsonl file")
    rows: list[tuple[object, object, str]] = []
    if path.suffix.lower() in (".jsonl", ".json"):
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{i}: not a JSON object ({exc.msg}); one {{\"text\": ..., \"label\": ...}} "
                                "per line") from None
            if not isinstance(obj, dict) or text_column not in obj or label_column not in obj:
                raise DataError(f"{path}:{i}: expected an object with {text_column!r} and {label_column!r}")
            rows.append((obj[text_column], obj[label_column], f"{path}:{i}"))
    elif path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            if text_column not in columns or label_column not in columns:
                raise DataError(f"{path}: the header must name columns {text_column!r} and {label_column!r}, "
                                f"found {reader.fieldnames}")
            for i, row in enumerate(reader, 2):
                rows.append((row[text_column], row[label_column], f"{path}:{i}"))
    else:
        raise DataError(f"{path}: unknown file type {path.suffix!r}; give a .csv or .jsonl file")
    texts, labels = [], []
    for text, label, where in rows:
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: the text is empty or not a string")
        texts.append(text)
        labels.append(parse_label(label, where))
    return ProbeDataset(texts, labels, position, ("0", "1"), path.stem).check()


# --------------------------------------------------------------------------------- token positions


@dataclass(frozen=True)
class ReadPositions:
    """Every text as the model sees it, and the position its probe reads."""

    #: token ids of each text (marker removed)
    tokens: list[list[int]]
    #: the position read in each text
    positions: list[int]
    #: per text, the token read and the one before it: the "type" the control task labels at random
    types: list[tuple[int, int]]


def _marked(tokenizer, text: str, marker: str, add_bos: bool | None) -> tuple[list[int], int]:
    """Return a marked text's tokens (marker removed) and the index of the token that ends before the marker."""
    cut = text.index(marker)
    clean = text[:cut] + text[cut + len(marker):]
    if cut == 0:
        raise DataError(f"the marker {marker!r} opens the text {text[:60]!r}; put it right after the token to read")
    enc = tokenizer.tok.encode(clean, add_special_tokens=False)
    ids = list(enc.ids)
    # the token holding the last character before the marker (a merge across it is read as one token)
    pos = next(i for i, (start, end) in enumerate(enc.offsets) if end >= cut)
    bos = tokenizer.add_bos if add_bos is None else add_bos
    if bos and tokenizer.bos_token_id is not None:
        ids, pos = [tokenizer.bos_token_id, *ids], pos + 1
    return ids, pos


def read_positions(model, dataset: ProbeDataset, prepend_bos: bool | None = None) -> ReadPositions:
    """Return the tokens of every text and the position to read (``dataset.position``), within the context."""
    tok = model._require_tokenizer()
    tokens, positions = [], []
    for text in dataset.texts:
        if dataset.position == "last":
            ids = tok.encode(text, add_bos=prepend_bos)
            pos = len(ids) - 1
        else:
            if dataset.position not in text:
                raise DataError(f"the position marker {dataset.position!r} is absent from {text[:60]!r}")
            ids, pos = _marked(tok, text, dataset.position, prepend_bos)
        if not ids:
            raise DataError(f"the text {text!r} has no tokens")
        if len(ids) > model.cfg.n_ctx:
            raise InputError(f"the text {text[:40]!r}... is {len(ids)} tokens, longer than the model's context of "
                             f"{model.cfg.n_ctx}; shorten it")
        tokens.append(ids)
        positions.append(pos)
    types = [(ids[p - 1] if p > 0 else -1, ids[p]) for ids, p in zip(tokens, positions)]
    return ReadPositions(tokens, positions, types)
