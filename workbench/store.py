"""On-disk activation store: write a corpus's activations at one or more hooks, read them back shuffled.

Layout of a store directory::

    manifest.json                 model, hooks, dtype, shapes, token count, shards with checksums
    shard-r0-00000/               one directory per shard (rank ``r0`` wrote it)
        blocks.3.hook_resid_post.npy   [rows, *shape]  activations, one memory-mappable file per hook
        tokens.npy                [rows]           int32 token id of each row
        positions.npy             [rows]           int32 position of each row in its window
        windows.npy               [rows]           int64 global index of each row's window
        context.npy               [n_windows, n_ctx]  int32 the full token windows (for showing text)
    shard-r0-00001/ ...

Rows are window-major, position-minor; a shard holds whole windows, so ``(window, position)`` of
any row leads back to its text. bfloat16 activations are kept as raw ``uint16`` in the ``.npy``
files (numpy has no bfloat16) and reinterpreted on read.

Crash safety: a shard is written under ``<name>.tmp``, fsynced, renamed, and only then listed
in the manifest (itself replaced atomically). A killed run therefore leaves at most an unlisted
shard, which a rerun deletes and rewrites; the rerun starts at the first unlisted window (resume
by offset: the corpus is not re-read). Because shards hold fixed groups of windows and the
forward batches never straddle shards, a resumed store is byte-for-byte the unbroken one.

Under ``torchrun`` shard ``i`` goes to rank ``i % world_size``; each rank lists its shards in
``manifest.r{rank}.json`` and rank 0 merges them into ``manifest.json`` at the end. The ranks come
from the process group :func:`workbench.distributed.init_distributed` joins (``workbench cache``
joins it; a script joins it before calling :func:`write_store`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
import typing
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from workbench.distributed import barrier, dist_info
from workbench.errors import ConfigError, DataError
from workbench.locking import lock_name, output_lock
from workbench.names import layer_of
from workbench.zoo import sha256_file

FORMAT = "workbench-activation-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
StoreDtype = Literal["float16", "bfloat16", "float32"]

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
# What each dtype is kept as on disk: numpy cannot name bfloat16, so it travels as its bits.
_NUMPY_DTYPES: dict[str, np.dtype] = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(np.uint16),
    "float32": np.dtype(np.float32),
}
_META_FILES = ("tokens.npy", "positions.npy", "windows.npy", "context.npy")
_SHARD_RE = re.compile(r"^shard-r(\d+)-(\d{5})$")
# Hooks whose second axis is not the position (attention scores/patterns are [batch head q k]).
_NOT_PER_POSITION = ("hook_attn_scores", "hook_pattern")


# --------------------------------------------------------------------------------------------
# configuration and small helpers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreConfig:
    """What to cache and how to cut it into shards."""

    hooks: tuple[str, ...]
    """Hook names to record, all in one forward pass (e.g. ``("blocks.3.hook_resid_post",)``)."""
    dtype: StoreDtype = "float32"
    """Dtype of the stored activations (the model itself runs in its own dtype)."""
    batch_windows: int = 8
    """Windows per forward pass."""
    shard_tokens: int = 1 << 16
    """Target rows per shard; rounded to whole forward batches so no batch straddles two shards."""
    first_position: int = 0
    """Positions before this one are not stored. 1 drops a BOS attention sink, whose outsized norm
    would otherwise dominate an SAE's reconstruction loss."""

    def __post_init__(self) -> None:
        if not self.hooks:
            raise ConfigError("StoreConfig.hooks is empty; name at least one hook, e.g. blocks.0.hook_resid_post")
        if len(set(self.hooks)) != len(self.hooks):
            raise ConfigError(f"StoreConfig.hooks lists a hook twice: {list(self.hooks)}")
        if self.dtype not in _TORCH_DTYPES:
            raise ConfigError(f"store dtype {self.dtype!r} is not one of {sorted(_TORCH_DTYPES)}")
        if self.batch_windows < 1 or self.shard_tokens < 1 or self.first_position < 0:
            raise ConfigError(
                f"batch_windows ({self.batch_windows}) and shard_tokens ({self.shard_tokens}) must be positive "
                f"and first_position ({self.first_position}) non-negative"
            )
        for hook in self.hooks:
            if hook.endswith(_NOT_PER_POSITION):
                raise ConfigError(
                    f"hook {hook!r} is not laid out per position ([batch head query_pos key_pos]); "
                    "a store keeps one row per token: choose a residual, attention-output, z or MLP hook"
                )


@dataclass(frozen=True)
class ReaderConfig:
    """How to stream shuffled batches from a store with a bounded memory footprint."""

    batch_size: int = 4096
    """Rows per batch."""
    buffer_rows: int = 1 << 18
    """Rows held in memory at once; rows are shuffled within this buffer."""
    block_rows: int = 1024
    """Rows read contiguously from one shard; blocks from all shards are shuffled, then rows
    within a buffer of blocks. Smaller blocks mix better, larger ones read faster."""
    seed: int = 0
    """Seed of the shuffle; ``(seed, epoch)`` fixes the order of an epoch."""
    drop_last: bool = True
    """Drop an epoch's final partial batch (the trainer then sees only full batches)."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Dtype of the batches handed out."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.block_rows < 1 or self.buffer_rows < self.block_rows:
            raise ConfigError(
                f"ReaderConfig needs batch_size >= 1 (got {self.batch_size}), block_rows >= 1 (got {self.block_rows}) "
                f"and buffer_rows >= block_rows (got {self.buffer_rows})"
            )


#: Hooks computed before the first block.
_EMBED_HOOKS = ("hook_embed", "hook_pos_embed")


def stop_layer(hooks: Sequence[str]) -> int | None:
    """Return the ``stop_at_layer`` that computes every hook in ``hooks`` and nothing after them."""
    stop = 0  # the embedding hooks need no block
    for hook in hooks:
        layer = layer_of(hook)
        if layer is None and hook not in _EMBED_HOOKS:
            return None  # ln_final / unembed hooks need the whole model
        if layer is not None:
            stop = max(stop, layer + 1)
    return stop


# --------------------------------------------------------------------------------------------
# the manifest
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredFile:
    """One file of a shard, as the manifest lists it."""

    sha256: str
    """SHA-256 of the file's bytes (compared when a store is opened with ``verify``)."""
    bytes: int
    """Its size in bytes (compared at every open)."""


@dataclass(frozen=True)
class ShardEntry:
    """One finished shard: a run of whole windows, written by one rank."""

    name: str
    """Directory name, ``shard-r{rank}-{index:05d}``."""
    rank: int
    """The ``torchrun`` rank that wrote it (0 without torchrun)."""
    index: int
    """Its place among the store's shards; shard ``i`` is written by rank ``i % world_size``."""
    window_start: int
    """Global index of its first window."""
    n_windows: int
    """Windows it holds."""
    rows: int
    """Rows it holds: ``n_windows * rows_per_window``."""
    files: dict[str, StoredFile]
    """File name -> size and checksum: one ``.npy`` per hook, then tokens, positions, windows and context."""


@dataclass(frozen=True)
class HookInfo:
    """What a store keeps of one hook."""

    shape: tuple[int, ...]
    """Shape of one row's activation (``[d_model]``; ``[n_heads, d_head]`` for ``attn.hook_z``)."""
    d_in: int
    """Features a row, ``shape`` flattened."""


@dataclass(frozen=True)
class ModelInfo:
    """The model a store was written by."""

    name: str
    """The name it was cached under (a zoo name or a path; may be empty)."""
    config: dict[str, Any]
    """Its config as ``cfg.to_dict()`` gives it (empty for a model without one)."""
    fingerprint: str
    """Hash of its parameter names, shapes and first values (:func:`model_fingerprint`): two
    checkpoints of one config differ here."""


@dataclass(frozen=True)
class CorpusInfo:
    """The token windows a store was written from."""

    n_windows: int
    """Windows in the whole corpus (over all ranks)."""
    sha256: str
    """Short digest of the windows' token ids: a resumed run must be given the same windows."""


#: StoreManifest fields that a finished run adds to its header; every other field must agree on resume.
_PROGRESS_FIELDS = ("complete", "n_rows", "shards")


@dataclass(frozen=True)
class StoreManifest:
    """``manifest.json`` of an activation store: what it holds and where (kept as this JSON, key for key).

    Frozen; the dict fields are the JSON's own tables and are not copied. :meth:`from_json` refuses
    a missing or unknown key, a value of the wrong type and numbers that disagree, naming the file.
    """

    format: str
    """Always ``workbench-activation-store``."""
    version: int
    """Layout version (1)."""
    model: ModelInfo
    """The model whose activations these are."""
    hooks: dict[str, HookInfo]
    """Hook name -> its row shape, in the order given to :class:`StoreConfig`."""
    dtype: StoreDtype
    """Dtype of the stored activations (bfloat16 is kept as its raw 16 bits)."""
    n_ctx: int
    """Tokens per window."""
    first_position: int
    """Positions before this one were not stored."""
    rows_per_window: int
    """Rows each window gives: ``n_ctx - first_position``."""
    corpus: CorpusInfo
    """The windows the store was written from."""
    n_tokens: int
    """Rows of the finished store: ``corpus.n_windows * rows_per_window``."""
    batch_windows: int
    """Windows per forward pass when it was written."""
    shard_windows: int
    """Windows per shard (the last shard may hold fewer)."""
    world_size: int
    """Processes that wrote it (``torchrun``)."""
    complete: bool
    """Whether every shard is written (an interrupted run leaves False; rerunning it finishes the store)."""
    n_rows: int
    """Rows listed so far: the sum of ``shards``' rows."""
    shards: tuple[ShardEntry, ...]
    """The finished shards, in window order."""

    def to_json(self) -> dict[str, Any]:
        """Return the manifest as the JSON object ``manifest.json`` holds."""
        return _to_json(self)

    @classmethod
    def from_json(cls, data: Any, path: Path) -> StoreManifest:
        """Return the manifest ``data`` (parsed from ``path``), or raise DataError naming the file and what is wrong."""
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != FORMAT_VERSION:
            data = data if isinstance(data, dict) else {}
            raise DataError(
                f"{path.parent} is not a {FORMAT} v{FORMAT_VERSION} store "
                f"(format {_short(data.get('format'))}, version {_short(data.get('version'))})"
            )
        manifest = _from_json(cls, data, path, "the manifest")
        manifest._check_consistent(path)
        return manifest

    @classmethod
    def read(cls, path: Path) -> StoreManifest:
        """Return the manifest in the file ``path``."""
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is not valid JSON ({exc}); the store is damaged: cache it again") from exc
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} is not UTF-8 text ({exc}); the store is damaged: cache it again") from exc
        return cls.from_json(data, path)

    def header(self) -> dict[str, Any]:
        """The JSON of the fields a resumed run must agree on (all but completion and the shard list)."""
        return {k: v for k, v in self.to_json().items() if k not in _PROGRESS_FIELDS}

    def with_shards(self, shards: Sequence[ShardEntry], complete: bool) -> StoreManifest:
        """Return this manifest listing ``shards`` (sorted into window order) and marked ``complete`` or not."""
        ordered = tuple(sorted(shards, key=lambda s: s.window_start))
        return replace(self, complete=complete, n_rows=sum(s.rows for s in ordered), shards=ordered)

    def row_bytes(self) -> int:
        """Bytes one row takes on disk: every hook's activation, its token id, position and window index."""
        itemsize = _NUMPY_DTYPES[self.dtype].itemsize
        return sum(h.d_in * itemsize for h in self.hooks.values()) + 4 + 4 + 8

    def _check_consistent(self, path: Path) -> None:
        """Raise DataError unless the numbers agree with each other (a hand-edited or damaged manifest is refused
        here, in one line, rather than as a TypeError or a wrong read deep in a reader)."""

        def bad(what: str) -> DataError:
            return DataError(f"{path} is damaged ({what}); the store cannot be read: delete it and cache it again")

        if not self.hooks:
            raise bad("'hooks' lists no hook")
        for hook, info in self.hooks.items():
            if not info.d_in:
                raise bad(f"hook {hook!r} has no positive d_in")
        if (not self.n_ctx or self.first_position >= self.n_ctx
                or self.rows_per_window != self.n_ctx - self.first_position):
            raise bad("n_ctx, first_position and rows_per_window disagree")
        needed = {f"{h}.npy" for h in self.hooks} | set(_META_FILES)
        for shard in self.shards:
            if not _SHARD_RE.match(shard.name):
                raise bad(f"a shard is named {_short(shard.name)}, not shard-rR-NNNNN")
            if shard.rows != shard.n_windows * self.rows_per_window:
                raise bad(f"shard {shard.name} lists {shard.rows} rows for {shard.n_windows} windows")
            if set(shard.files) != needed:
                raise bad(f"shard {shard.name} lists the files {sorted(shard.files)}, not {sorted(needed)}")
        if self.n_rows != sum(s.rows for s in self.shards):
            raise bad(f"n_rows {self.n_rows} is not the sum of its shards' rows")


def _to_json(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    return value


def _from_json(cls: type, data: Any, path: Path, where: str) -> Any:
    """Build the dataclass ``cls`` from the JSON object ``data`` (``where`` it sits in ``path``), checking every key."""

    def bad(what: str) -> DataError:
        return DataError(f"{path} is damaged ({what}); the store cannot be read: delete it and cache it again")

    if not isinstance(data, dict):
        raise bad(f"{where} is {_short(data)}, not an object")
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise DataError(
            f"{path}: {where} has unknown key(s) {unknown} (it holds {names}); the file was written by another "
            "version of the workbench or edited by hand: cache the store again with this version"
        )
    missing = [n for n in names if n not in data]
    if missing:
        raise bad(f"{where} lacks the key(s) {missing}")
    hints = typing.get_type_hints(cls)
    return cls(**{n: _json_value(hints[n], data[n], path, f"{where}.{n}" if where != "the manifest" else repr(n))
                  for n in names})


def _json_value(hint: Any, value: Any, path: Path, where: str) -> Any:
    """Return ``value`` as the type ``hint`` asks for, or raise DataError saying what it is instead."""

    def bad(expected: str) -> DataError:
        return DataError(f"{path} is damaged ({where} is {_short(value)}, not {expected}); the store cannot be read: "
                         "delete it and cache it again")

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if is_dataclass(hint):
        return _from_json(hint, value, path, where)
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise bad("a count")
        return value
    if origin is typing.Literal:
        if not isinstance(value, str) or value not in args:
            raise bad(f"one of {list(args)}")
        return value
    if hint is bool or hint is str:
        if not isinstance(value, hint):
            raise bad("true or false" if hint is bool else "a string")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise bad("an object")
        if args[1] is Any:
            return value
        return {k: _json_value(args[1], v, path, f"{where}[{k!r}]") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, list):
            raise bad("a list")
        return tuple(_json_value(args[0], v, path, f"{where}[{i}]") for i, v in enumerate(value))
    raise TypeError(f"no JSON reader for {hint}")  # a field type added to the manifest without one


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def model_fingerprint(model: torch.nn.Module) -> str:
    """Return a short hash of a model's parameter names, shapes and first bytes.

    Cheap (reads ~4 KiB a tensor) and tells a trained checkpoint from a fresh one of the same
    config, which is what a store check needs.
    """
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        flat = p.detach().reshape(-1)[:1024].to("cpu", torch.float32).contiguous()
        h.update(flat.numpy().tobytes())
    return h.hexdigest()[:16]


def _model_config(model: Any) -> dict[str, Any]:
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        return dict(cfg.to_dict())
    return {}


def _tokens_digest(windows: Tensor) -> str:
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def _write_manifest(path: Path, manifest: StoreManifest) -> None:
    """Replace the manifest file ``path`` atomically (written aside, fsynced, renamed)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest.to_json(), f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """Return the bytes of a ``.npy`` header (version 1.0) for a C-ordered array."""
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    text = repr(header).encode("latin1")
    # magic(6) + version(2) + len(2) + text + padding + '\n' must be a multiple of 64.
    pad = 64 - (10 + len(text) + 1) % 64
    text = text + b" " * (pad % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text


class _HashingFile:
    """A file written sequentially whose SHA-256 is computed as it is written."""

    def __init__(self, path: Path, header: bytes) -> None:
        self.f = open(path, "wb")
        self.h = hashlib.sha256()
        self.n = 0
        self.write(header)

    def write(self, data: bytes | memoryview) -> None:
        self.f.write(data)
        self.h.update(data)
        self.n += len(data)

    def close(self) -> StoredFile:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return StoredFile(sha256=self.h.hexdigest(), bytes=self.n)

    def abort(self) -> None:
        try:
            self.f.close()
        except OSError:
            pass


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


class WriteResult(NamedTuple):
    """What :func:`write_store` did."""

    path: Path
    """The store directory."""
    n_rows: int
    """Rows (tokens) the finished store holds, over all ranks."""
    shards_written: int
    """Shards this call wrote (0 when the store was already complete)."""
    shards_skipped: int
    """Shards found already written by an earlier, interrupted run and kept."""
    seconds: float
    """Wall time of this call."""


@dataclass
class _ShardPlan:
    index: int
    window_start: int
    n_windows: int

    def name(self, rank: int) -> str:
        return f"shard-r{rank}-{self.index:05d}"


def _plan_shards(n_windows: int, rows_per_window: int, cfg: StoreConfig) -> list[_ShardPlan]:
    per_shard = max(1, round(cfg.shard_tokens / max(rows_per_window, 1) / cfg.batch_windows)) * cfg.batch_windows
    return [
        _ShardPlan(i, start, min(per_shard, n_windows - start))
        for i, start in enumerate(range(0, n_windows, per_shard))
    ]


def _header(model: Any, model_name: str, windows: Tensor, cfg: StoreConfig, shapes: dict[str, tuple[int, ...]],
            world_size: int, shard_windows: int) -> StoreManifest:
    """The manifest of the store to write, with no shard listed yet (its header must agree on resume)."""
    n_windows, n_ctx = windows.shape
    rows_per_window = n_ctx - cfg.first_position
    return StoreManifest(
        format=FORMAT,
        version=FORMAT_VERSION,
        # the config as JSON gives it back, so a resumed run compares equal values
        model=ModelInfo(name=model_name, config=json.loads(json.dumps(_model_config(model))),
                        fingerprint=model_fingerprint(model)),
        hooks={h: HookInfo(shape=shapes[h], d_in=int(np.prod(shapes[h]))) for h in cfg.hooks},
        dtype=cfg.dtype,
        n_ctx=int(n_ctx),
        first_position=cfg.first_position,
        rows_per_window=rows_per_window,
        corpus=CorpusInfo(n_windows=int(n_windows), sha256=_tokens_digest(windows)),
        n_tokens=int(n_windows * rows_per_window),
        batch_windows=cfg.batch_windows,
        shard_windows=shard_windows,
        world_size=world_size,
        complete=False,
        n_rows=0,
        shards=(),
    )


def _probe_shapes(model: Any, windows: Tensor, cfg: StoreConfig, stop: int | None,
                  device: torch.device) -> dict[str, tuple[int, ...]]:
    # Two tokens are enough to learn the shapes; a whole window would cost a forward pass.
    probe = windows[:1, : min(2, windows.shape[1])].to(device)
    with torch.no_grad():
        _, cache = model.run_with_cache(probe, names_filter=list(cfg.hooks), stop_at_layer=stop)
    shapes = {}
    for h in cfg.hooks:
        act = cache[h]
        if act.ndim < 3 or act.shape[1] != probe.shape[1]:
            raise ConfigError(
                f"hook {h!r} gives activations of shape {tuple(act.shape)}, not [batch pos ...]; "
                "a store keeps one row per token: choose a per-position hook"
            )
        shapes[h] = tuple(int(s) for s in act.shape[2:])
    return shapes


def _check_resume(out: Path, header: StoreManifest, progress_path: Path) -> list[ShardEntry]:
    """Return the shards an earlier run of the same job listed; refuse a store of another job."""
    source = progress_path if progress_path.is_file() else out / MANIFEST
    if not source.is_file():
        return []
    try:
        old = StoreManifest.read(source)
    except DataError as exc:
        raise DataError(f"{exc}; to write a store here choose another --out directory or delete {out}") from exc
    theirs = old.header()
    for key, value in header.header().items():
        if theirs[key] != value:
            raise DataError(
                f"{out} already holds a different activation store ({key}: {_short(theirs[key])} there, "
                f"{_short(value)} requested); choose another --out directory or delete {out}"
            )
    return list(old.shards)


def _shard_intact(out: Path, shard: ShardEntry) -> bool:
    """Return whether every file the manifest lists for ``shard`` is there with its listed size."""
    try:
        return all((out / shard.name / f).stat().st_size == meta.bytes for f, meta in shard.files.items())
    except OSError:
        return False


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) < 120 else text[:117] + "..."


def _clean_unlisted(out: Path, rank: int, listed: set[str]) -> None:
    """Delete shards of this rank that no manifest lists: half-written or written-but-unlisted."""
    for p in out.iterdir():
        if p.name.endswith(".tmp") and p.name.startswith(f"shard-r{rank}-"):
            shutil.rmtree(p, ignore_errors=True)
        m = _SHARD_RE.match(p.name)
        if m and int(m.group(1)) == rank and p.name not in listed:
            shutil.rmtree(p, ignore_errors=True)


class _ShardWriter:
    """Writes one shard's files under a temporary name; ``finish`` fsyncs and renames them."""

    def __init__(self, out: Path, name: str, plan: _ShardPlan, header: StoreManifest, windows: Tensor) -> None:
        self.out, self.name, self.plan = out, name, plan
        self.tmp = out / (name + ".tmp")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        rows = plan.n_windows * header.rows_per_window
        np_dtype = _NUMPY_DTYPES[header.dtype]
        self.files: dict[str, _HashingFile] = {}
        for hook, meta in header.hooks.items():
            shape = (rows, *meta.shape)
            self.files[hook + ".npy"] = _HashingFile(self.tmp / (hook + ".npy"), _npy_header(np_dtype, shape))
        # Token ids, positions and window indices are known up front: write them now.
        ctx = windows[plan.window_start : plan.window_start + plan.n_windows].to(torch.int32).numpy()
        first = header.first_position
        n_ctx = header.n_ctx
        meta_arrays = {
            "tokens.npy": np.ascontiguousarray(ctx[:, first:]).reshape(-1),
            "positions.npy": np.tile(np.arange(first, n_ctx, dtype=np.int32), plan.n_windows),
            "windows.npy": np.repeat(
                np.arange(plan.window_start, plan.window_start + plan.n_windows, dtype=np.int64), n_ctx - first
            ),
            "context.npy": np.ascontiguousarray(ctx),
        }
        for fname, arr in meta_arrays.items():
            f = _HashingFile(self.tmp / fname, _npy_header(arr.dtype, arr.shape))
            f.write(memoryview(arr).cast("B"))
            self.files[fname] = f
        self.rows = rows

    def write(self, hook: str, arr: np.ndarray) -> None:
        self.files[hook + ".npy"].write(memoryview(np.ascontiguousarray(arr)).cast("B"))

    def finish(self) -> ShardEntry:
        listing = {fname: f.close() for fname, f in self.files.items()}
        _fsync_dir(self.tmp)
        final = self.out / self.name
        if final.exists():  # an unlisted leftover of a killed run: the new one replaces it
            shutil.rmtree(final)
        os.rename(self.tmp, final)
        _fsync_dir(self.out)
        return ShardEntry(
            name=self.name,
            rank=int(_SHARD_RE.match(self.name).group(1)),  # type: ignore[union-attr]
            index=self.plan.index,
            window_start=self.plan.window_start,
            n_windows=self.plan.n_windows,
            rows=self.rows,
            files=listing,
        )

    def abort(self) -> None:
        for f in self.files.values():
            f.abort()
        shutil.rmtree(self.tmp, ignore_errors=True)


def write_store(
    model: Any,
    windows: Int[Tensor, "batch pos"],
    out: str | Path,
    cfg: StoreConfig,
    model_name: str = "",
    on_shard: Callable[[int], None] | None = None,
    progress: bool = False,
) -> WriteResult:
    """Cache the activations of ``cfg.hooks`` for every token of ``windows`` into the store ``out``.

    Reruns with the same arguments resume where a killed run stopped; a directory holding a store
    of another model, corpus, hook set or dtype is refused. ``on_shard(index)`` is called after
    each shard is listed (tests use it to simulate a kill). Under ``torchrun`` every rank calls
    this with the same arguments, after joining the process group with
    :func:`workbench.distributed.init_distributed` (launched with no group joined is a ConfigError).
    """
    t0 = time.perf_counter()
    out = Path(out)
    windows = _checked_windows(model, windows, cfg)
    rank, world = dist_info()
    device = next(iter(model.parameters())).device if hasattr(model, "parameters") else torch.device("cpu")
    stop = stop_layer(cfg.hooks)
    plans = _plan_shards(windows.shape[0], windows.shape[1] - cfg.first_position, cfg)
    header = _header(model, model_name, windows, cfg, _probe_shapes(model, windows, cfg, stop, device), world,
                     shard_windows=plans[0].n_windows)

    # One writer per store (per rank under torchrun): a second `workbench cache --out SAME` fails at once.
    with output_lock(out, lock_name(rank)):
        progress_path = out / (MANIFEST if world == 1 else f"manifest.r{rank}.json")
        done = _resume(out, header, progress_path, rank)
        mine = [p for p in plans if p.index % world == rank]
        todo = [p for p in mine if p.name(rank) not in {s.name for s in done}]
        _check_disk_space(out, todo, header)
        bar = _progress_bar(progress and rank == 0, sum(p.n_windows for p in mine) * header.rows_per_window,
                            sum(s.rows for s in done))
        try:
            shards = _write_shards(model, windows, out, cfg, header, todo, done, stop, device, progress_path,
                                   on_shard, bar)
        finally:
            if bar is not None:
                bar.close()
        _write_final_manifest(out, header, shards, progress_path, len(plans))
    return WriteResult(out, header.n_tokens, len(todo), len(done), time.perf_counter() - t0)


def _checked_windows(model: Any, windows: Any, cfg: StoreConfig) -> Int[Tensor, "batch pos"]:
    """Return ``windows`` as int64 on the CPU, or raise naming why they cannot be cached."""
    windows = torch.as_tensor(windows)
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.dtype not in (torch.int64, torch.int32):
        raise DataError(
            f"expected token windows as an integer tensor [n_windows, n_ctx] with n_windows > 0, got "
            f"{windows.dtype} {tuple(windows.shape)}; build them with workbench.tokenize / workbench.corpora"
        )
    windows = windows.to(torch.int64).cpu()
    if cfg.first_position >= windows.shape[1]:
        raise ConfigError(
            f"first_position {cfg.first_position} leaves no positions of windows of length {windows.shape[1]}"
        )
    d_vocab = _model_config(model).get("d_vocab")
    if d_vocab is not None and (int(windows.max()) >= d_vocab or int(windows.min()) < 0):
        raise DataError(
            f"token ids range over [{int(windows.min())}, {int(windows.max())}] but the model's vocabulary has "
            f"{d_vocab} entries; tokenize the corpus with this model's tokenizer"
        )
    return windows


def _resume(out: Path, header: StoreManifest, progress_path: Path, rank: int) -> list[ShardEntry]:
    """Return this rank's shards that an earlier run of this job finished and that are still intact; delete the rest.

    A listed shard whose files are gone or of the wrong size (deleted or truncated since) is unlisted
    here, so it is written again.
    """
    listed = [s for s in _check_resume(out, header, progress_path) if s.rank == rank]
    done = [s for s in listed if _shard_intact(out, s)]
    if len(done) < len(listed):  # the manifest no longer tells the truth: say so before repairing
        _write_manifest(progress_path, header.with_shards(done, complete=False))
    _clean_unlisted(out, rank, {s.name for s in done})
    return done


def _write_shards(model: Any, windows: Tensor, out: Path, cfg: StoreConfig, header: StoreManifest,
                  todo: list[_ShardPlan], done: list[ShardEntry], stop: int | None, device: torch.device,
                  progress_path: Path, on_shard: Callable[[int], None] | None, bar: Any) -> list[ShardEntry]:
    """Write the shards ``todo``, listing each in the progress manifest as it is finished; return every shard of
    this rank (``done`` and the new ones)."""
    rank, _ = dist_info()
    shards = list(done)
    # One writer thread: file writes and hashing release the GIL and overlap the next forward pass.
    with ThreadPoolExecutor(max_workers=1) as pool:
        for plan in todo:
            shards.append(_write_shard(model, windows, out, cfg, header, plan, rank, stop, device, pool, bar))
            _write_manifest(progress_path, header.with_shards(shards, complete=False))
            if on_shard is not None:
                on_shard(plan.index)
    return shards


def _write_shard(model: Any, windows: Tensor, out: Path, cfg: StoreConfig, header: StoreManifest, plan: _ShardPlan,
                 rank: int, stop: int | None, device: torch.device, pool: ThreadPoolExecutor, bar: Any) -> ShardEntry:
    """Run the forward passes of one shard's windows and write their activations; return its manifest entry.

    On any error the half-written shard is deleted (a full disk becomes a DataError saying how to resume).
    """
    writer = _ShardWriter(out, plan.name(rank), plan, header, windows)
    pending: Future | None = None
    try:
        for b0 in range(plan.window_start, plan.window_start + plan.n_windows, cfg.batch_windows):
            b1 = min(b0 + cfg.batch_windows, plan.window_start + plan.n_windows)
            arrays = _batch_activations(model, windows[b0:b1].to(device), b0, cfg, stop)
            if pending is not None:
                pending.result()
            pending = pool.submit(_write_batch, writer, arrays)
            if bar is not None:
                bar.update(arrays[cfg.hooks[0]].shape[0])
        if pending is not None:
            pending.result()
            pending = None
        return writer.finish()
    except BaseException as exc:
        if pending is not None:
            try:
                pending.result()
            except BaseException:  # noqa: BLE001 - the first error is the one to report
                pass
        writer.abort()
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DataError(
                f"the disk holding {out} is full (while writing {writer.name}); nothing listed was lost: "
                "free space and rerun the same command, it resumes at that shard"
            ) from exc
        raise


def _progress_bar(show: bool, total: int, initial: int) -> Any:
    """A tqdm bar over the rows to cache (None when not shown)."""
    if not show:
        return None
    return tqdm(total=total, initial=initial, unit="tok", desc="cache")


def _check_disk_space(out: Path, todo: list[_ShardPlan], header: StoreManifest) -> None:
    """Raise DataError, before anything is written, when the shards still to write do not fit on the disk."""
    need = sum(p.n_windows for p in todo) * header.rows_per_window * header.row_bytes()
    free = shutil.disk_usage(out).free
    if need > free:
        raise DataError(
            f"caching needs about {need / 2**30:.2f} GiB in {out} but only {free / 2**30:.2f} GiB are free; "
            "free space, pick another --out, lower --tokens, or use --dtype bfloat16/float16"
        )


def _batch_activations(model: Any, batch: Tensor, b0: int, cfg: StoreConfig, stop: int | None) -> dict[str, np.ndarray]:
    """Return each hook's activations of ``batch`` (windows from ``b0``) as ``[rows, ...]`` store-dtype arrays."""
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=list(cfg.hooks), stop_at_layer=stop)
    arrays = {}
    for hook in cfg.hooks:
        act = cache[hook][:, cfg.first_position :].to(_TORCH_DTYPES[cfg.dtype])
        _check_finite(act, hook, b0, cfg.first_position)
        act = act.reshape(-1, *act.shape[2:]).cpu()
        if cfg.dtype == "bfloat16":
            act = act.view(torch.int16)  # numpy has no bfloat16: its bytes travel as int16
        arrays[hook] = act.numpy().view(_NUMPY_DTYPES[cfg.dtype])
    return arrays


def _write_final_manifest(out: Path, header: StoreManifest, shards: list[ShardEntry], progress_path: Path,
                          n_plans: int) -> None:
    """Mark the store complete; under torchrun rank 0 merges every rank's manifest once all have finished."""
    rank, world = dist_info()
    if world == 1:
        _write_manifest(out / MANIFEST, header.with_shards(shards, complete=True))
        return
    _write_manifest(progress_path, header.with_shards(shards, complete=True))
    barrier()
    if rank == 0:
        merged: list[ShardEntry] = []
        for r in range(world):
            part = StoreManifest.read(out / f"manifest.r{r}.json")
            if not part.complete:
                raise DataError(f"rank {r} did not finish its shards in {out}; rerun the same torchrun command")
            merged.extend(part.shards)
        _write_manifest(out / MANIFEST, header.with_shards(merged, complete=len(merged) == n_plans))
    barrier()


def _write_batch(writer: _ShardWriter, arrays: dict[str, np.ndarray]) -> None:
    for hook, arr in arrays.items():
        writer.write(hook, arr)


def _check_finite(act: Tensor, hook: str, window0: int, first_position: int) -> None:
    if bool(torch.isfinite(act).all()):
        return
    bad = (~torch.isfinite(act)).reshape(act.shape[0], act.shape[1], -1).any(-1).nonzero()[0].tolist()
    raise DataError(
        f"non-finite activation (NaN or Inf) at hook {hook!r}, window {window0 + bad[0]}, position "
        f"{bad[1] + first_position}; nothing from this shard was kept. Check the model's weights and dtype "
        "(float16 overflows above 65504: use --dtype bfloat16 or float32)"
    )


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


class RowBatch(NamedTuple):
    """A run of consecutive rows of a store."""

    start: int
    """Index of the first row."""
    acts: Float[Tensor, "batch d_in"]
    """Activations, flattened to ``d_in`` features a row."""


@dataclass
class ActivationStore:
    """A finished activation store opened for reading (files are memory-mapped, not loaded)."""

    path: Path
    """The store directory."""
    manifest: StoreManifest
    """What it holds (``manifest.json``)."""
    _maps: dict[tuple[int, str], np.ndarray] = field(default_factory=dict, repr=False)

    # -- opening and checks ------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, verify: bool = False, allow_incomplete: bool = False) -> ActivationStore:
        """Open the store at ``path``; ``verify`` re-hashes every file against the manifest."""
        path = Path(path)
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise DataError(f"{path} holds no {MANIFEST}; write a store there with `workbench cache` first")
        manifest = StoreManifest.read(mpath)
        if not manifest.complete and not allow_incomplete:
            raise DataError(
                f"the store in {path} is incomplete ({manifest.n_rows} of {manifest.n_tokens} rows); "
                "rerun the `workbench cache` command that wrote it to finish it"
            )
        store = cls(path, manifest)
        store._check_files(verify)
        return store

    def _check_files(self, verify: bool) -> None:
        for shard in self.shards:
            for fname, meta in shard.files.items():
                p = self.path / shard.name / fname
                if not p.is_file():
                    raise DataError(f"store file {p} is missing; the store is damaged: cache it again")
                size = p.stat().st_size
                if size != meta.bytes:
                    raise DataError(
                        f"store file {p} has {size} bytes, the manifest says {meta.bytes} (truncated or "
                        "overwritten); delete that shard directory and rerun `workbench cache` to rewrite it"
                    )
                if verify and sha256_file(p, progress=False) != meta.sha256:
                    raise DataError(
                        f"store file {p} does not match its checksum; delete that shard directory and rerun "
                        "`workbench cache` to rewrite it"
                    )

    def check_model(self, model: Any, model_name: str | None = None) -> None:
        """Raise unless this store was written by ``model`` (same config and weights)."""
        m = self.manifest.model
        cfg = _model_config(model)
        if cfg and m.config and cfg != m.config:
            diff = sorted(k for k in set(cfg) | set(m.config) if cfg.get(k) != m.config.get(k))
            raise DataError(
                f"the store in {self.path} was written by another model ({m.name or 'unnamed'}; config differs "
                f"in {diff}); cache activations of this model with `workbench cache`"
            )
        if model_fingerprint(model) != m.fingerprint:
            raise DataError(
                f"the store in {self.path} was written by a model with other weights ({m.name or 'unnamed'}); "
                "cache activations of this model with `workbench cache`"
            )
        if model_name and m.name and model_name != m.name:
            raise DataError(f"the store in {self.path} is of model {m.name!r}, not {model_name!r}")

    def check_hook(self, hook: str, d_in: int | None = None) -> None:
        """Raise unless the store holds ``hook`` (with ``d_in`` features a row, when given)."""
        if hook not in self.manifest.hooks:
            raise DataError(
                f"the store in {self.path} holds no hook {hook!r}; it holds {sorted(self.manifest.hooks)}. "
                "Cache that hook with `workbench cache --hooks ...`"
            )
        if d_in is not None and self.d_in(hook) != d_in:
            raise DataError(
                f"hook {hook!r} in {self.path} has d_in {self.d_in(hook)}, the SAE expects {d_in}; "
                "use an SAE trained on this hook"
            )

    def check_sae(self, sae: Any, hook: str) -> None:
        """Raise unless ``sae`` can read this store's ``hook``: the width matches and, where the SAE
        records what it was trained on (SAELens ``metadata``), the hook and model do too."""
        self.check_hook(hook, d_in=sae.cfg.d_in)
        meta = getattr(sae, "metadata", None) or {}
        trained_hook = meta.get("hook_name")
        if trained_hook and trained_hook != "synthetic" and trained_hook != hook:
            raise DataError(
                f"the SAE was trained on hook {trained_hook!r}, not {hook!r} (both have d_in {sae.cfg.d_in}); "
                f"evaluate it on {trained_hook!r} or train an SAE for {hook!r}"
            )
        # Model names are compared only for SAEs the workbench trained: SAELens releases name
        # models their own way ("gpt2-small"), which would refuse good pairs.
        store_model = self.manifest.model.name
        sae_model = meta.get("model_name")
        if meta.get("trained_with") == "interp-workbench" and store_model and sae_model and store_model != sae_model:
            raise DataError(
                f"the SAE was trained on activations of {sae_model!r}; the store in {self.path} holds {store_model!r}. "
                "Use a store of the SAE's model, or train an SAE on this one"
            )

    # -- facts ---------------------------------------------------------------------------------

    @property
    def shards(self) -> tuple[ShardEntry, ...]:
        return self.manifest.shards

    @property
    def hooks(self) -> list[str]:
        return list(self.manifest.hooks)

    @property
    def n_rows(self) -> int:
        return self.manifest.n_rows

    @property
    def n_ctx(self) -> int:
        return self.manifest.n_ctx

    @property
    def dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self.manifest.dtype]

    def d_in(self, hook: str) -> int:
        return self.manifest.hooks[hook].d_in

    def _offsets(self) -> np.ndarray:
        return np.cumsum([0] + [s.rows for s in self.shards])

    # -- raw access ----------------------------------------------------------------------------

    def _map(self, shard_idx: int, fname: str) -> np.ndarray:
        key = (shard_idx, fname)
        if key not in self._maps:
            shard = self.shards[shard_idx]
            p = self.path / shard.name / fname
            try:
                arr = np.load(p, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError, EOFError) as exc:
                raise DataError(f"store file {p} cannot be read ({exc}); delete that shard directory and rerun "
                                "`workbench cache` to rewrite it") from None
            hook = fname[: -len(".npy")]
            if fname == "context.npy":
                fits = arr.shape == (shard.n_windows, self.n_ctx)
            elif hook in self.manifest.hooks:
                fits = arr.shape[:1] == (shard.rows,) and arr.size == shard.rows * self.d_in(hook)
            else:
                fits = arr.shape == (shard.rows,)
            if not fits:
                raise DataError(f"store file {p} holds an array of shape {arr.shape}, not what the manifest lists; "
                                "delete that shard directory and rerun `workbench cache` to rewrite it")
            self._maps[key] = arr
        return self._maps[key]

    def _to_tensor(self, arr: np.ndarray, dtype: torch.dtype | None) -> Tensor:
        t = torch.from_numpy(np.array(arr))  # a copy: the memory map stays read-only
        if self.manifest.dtype == "bfloat16":
            t = t.view(torch.bfloat16)
        return t if dtype is None else t.to(dtype)

    def acts(self, hook: str, start: int = 0, stop: int | None = None,
             dtype: torch.dtype | None = torch.float32) -> Float[Tensor, "batch d_in"]:
        """Return rows ``start:stop`` of ``hook`` flattened to ``[rows, d_in]`` (float32 unless ``dtype``)."""
        self.check_hook(hook)
        stop = self.n_rows if stop is None else min(stop, self.n_rows)
        offsets = self._offsets()
        parts = []
        for i in range(len(self.shards)):
            lo, hi = max(start, offsets[i]), min(stop, offsets[i + 1])
            if lo < hi:
                parts.append(self._to_tensor(self._map(i, hook + ".npy")[lo - offsets[i] : hi - offsets[i]], dtype))
        if not parts:
            return torch.empty(0, self.d_in(hook), dtype=dtype or self.dtype)
        return torch.cat(parts).reshape(-1, self.d_in(hook))

    def _meta(self, fname: str) -> np.ndarray:
        return np.concatenate([np.asarray(self._map(i, fname)) for i in range(len(self.shards))])

    def tokens(self) -> Int[Tensor, " batch"]:
        """Token id of every row."""
        return torch.from_numpy(self._meta("tokens.npy")).long()

    def positions(self) -> Int[Tensor, " batch"]:
        """Position of every row within its window."""
        return torch.from_numpy(self._meta("positions.npy")).long()

    def window_index(self) -> Int[Tensor, " batch"]:
        """Global window index of every row."""
        return torch.from_numpy(self._meta("windows.npy")).long()

    def windows(self) -> Int[Tensor, "batch pos"]:
        """All token windows of the corpus, in order.

        Row ``r`` of the store is token ``positions[r]`` of window ``window_index[r]``."""
        return torch.from_numpy(self._meta("context.npy")).long()

    def row_of(self, window: int, position: int) -> int:
        """Return the row holding token ``position`` of window ``window``."""
        first, per = self.manifest.first_position, self.manifest.rows_per_window
        if not (first <= position < self.n_ctx) or not (0 <= window < self.manifest.corpus.n_windows):
            raise DataError(
                f"(window {window}, position {position}) is not stored (positions {first}..{self.n_ctx - 1})"
            )
        return window * per + position - first

    def verify(self) -> None:
        """Re-hash every file against the manifest; raise on the first mismatch."""
        self._check_files(verify=True)

    # -- streaming -----------------------------------------------------------------------------

    def iter_rows(self, hook: str, batch_size: int, start: int = 0, stop: int | None = None,
                  dtype: torch.dtype = torch.float32) -> Iterator[RowBatch]:
        """Yield consecutive rows in order, ``batch_size`` at a time (one pass for statistics)."""
        stop = self.n_rows if stop is None else min(stop, self.n_rows)
        for b0 in range(start, stop, batch_size):
            yield RowBatch(b0, self.acts(hook, b0, min(b0 + batch_size, stop), dtype=dtype))

    def _blocks(self, block_rows: int) -> list[tuple[int, int, int]]:
        return [
            (i, lo, min(lo + block_rows, s.rows))
            for i, s in enumerate(self.shards)
            for lo in range(0, s.rows, block_rows)
        ]

    def _groups(self, cfg: ReaderConfig, epoch: int) -> list[list[tuple[int, int, int]]]:
        blocks = self._blocks(cfg.block_rows)
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(blocks))
        groups: list[list[tuple[int, int, int]]] = [[]]
        size = 0
        for j in order:
            blk = blocks[j]
            n = blk[2] - blk[1]
            if groups[-1] and size + n > cfg.buffer_rows:
                groups.append([])
                size = 0
            groups[-1].append(blk)
            size += n
        return groups

    def epoch_rows(self, cfg: ReaderConfig) -> int:
        """Rows one epoch of :meth:`batches` hands out (all rows, less a dropped partial batch)."""
        return (self.n_rows // cfg.batch_size) * cfg.batch_size if cfg.drop_last else self.n_rows

    def batches(self, hook: str, cfg: ReaderConfig, epoch: int = 0,
                offset: int = 0) -> Iterator[Float[Tensor, "batch d_in"]]:
        """Yield one epoch of shuffled ``[batch_size, d_in]`` batches, starting ``offset`` rows in.

        The order is fixed by ``(cfg.seed, epoch)``: blocks of ``cfg.block_rows`` rows from all
        shards are permuted, cut into buffers of at most ``cfg.buffer_rows`` rows, and rows are
        permuted within each buffer. Resuming at ``offset`` (a multiple of the batch size) reads
        only from the buffer that holds it on, and yields exactly the batches an unbroken epoch
        would have yielded from there.
        """
        self.check_hook(hook)
        d_in = self.d_in(hook)
        out_dtype = _TORCH_DTYPES[cfg.dtype]
        groups = self._groups(cfg, epoch)
        limit = self.epoch_rows(cfg)
        if offset >= limit:
            return
        carry: list[Tensor] = []
        carried = 0
        pos = 0  # rows of the epoch's stream before the current group
        emitted = offset
        for g, group in enumerate(groups):
            size = sum(b[2] - b[1] for b in group)
            if pos + size <= offset:
                pos += size
                continue
            buf = torch.cat([self._to_tensor(self._map(i, hook + ".npy")[lo:hi], out_dtype) for i, lo, hi in group])
            buf = buf.reshape(-1, d_in)
            perm = torch.from_numpy(np.random.default_rng([cfg.seed, epoch, g]).permutation(size))
            skip = max(0, offset - pos)
            pos += size
            rows = buf[perm[skip:]]
            while rows.shape[0]:
                take = min(cfg.batch_size - carried, rows.shape[0])
                carry.append(rows[:take])
                carried += take
                rows = rows[take:]
                if carried == cfg.batch_size:
                    yield torch.cat(carry) if len(carry) > 1 else carry[0]
                    emitted += cfg.batch_size
                    carry, carried = [], 0
                    if emitted >= limit:
                        return
        if carry and not cfg.drop_last:
            yield torch.cat(carry)

    def stream(self, hook: str, cfg: ReaderConfig, start_row: int = 0) -> Iterator[Float[Tensor, "batch d_in"]]:
        """Yield shuffled batches forever, epoch after epoch, from ``start_row`` rows into the stream.

        ``start_row`` counts rows handed out since epoch 0 (a trainer's data offset); epoch ``e``
        uses the shuffle of ``(cfg.seed, e)``.
        """
        per_epoch = self.epoch_rows(cfg)
        if per_epoch == 0:
            raise DataError(
                f"the store in {self.path} has {self.n_rows} rows, fewer than one batch of {cfg.batch_size}; "
                "cache more tokens or lower the batch size"
            )
        epoch, offset = divmod(start_row, per_epoch)
        while True:
            yield from self.batches(hook, cfg, epoch, offset)
            epoch, offset = epoch + 1, 0


def open_store(path: str | Path, verify: bool = False) -> ActivationStore:
    """Open a finished store (see :meth:`ActivationStore.open`)."""
    return ActivationStore.open(path, verify=verify)
