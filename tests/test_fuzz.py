"""Fuzz suite (issue 13): hostile and careless inputs to the readers and the CLI, from a seeded generator.

Each case must end in one of two ways: a correct result, or a one-line error of the workbench's own
classes (``WorkbenchError``); never a traceback of another type, a multi-line message, a process
out of memory (an address-space limit turns a runaway allocation into a failure here), or a file
written half. Targets: the GGUF reader, native checkpoints (config.json + safetensors), the
activation store's manifest and shards, and the CLI's numeric flags.

The generator is seeded (``random.Random(SEED)``), so a failure names a case that reruns the same way.
Run ``.venv/bin/python tests/test_fuzz.py`` to print the number of cases and the distinct error
messages (temporary paths shown as ``<tmp>``).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import re
import resource
import shutil
import struct
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workbench.errors import WorkbenchError  # noqa: E402

SEED = 13
#: generated cases per target (the whole suite stays well under a minute on one busy core)
CASES = {"gguf": 100, "checkpoint": 120, "store": 120, "cli": 120}

#: every outcome of every case: (target, "ok" or the error message with temporary paths replaced)
OUTCOMES: list[tuple[str, str]] = []

_NASTY_NUMBERS = [0, -1, -7, 1, 2, 3, 10**9, 2**31 - 1, 2**32 - 1, 2**63 - 1, 1e9, 1e308, -1e-300, 1e-300, 0.5]
_NASTY_JSON = [*_NASTY_NUMBERS, "NaN", "Infinity", "-Infinity", None, True, False, "", "x", "64", [], {}, [1, 2],
               {"a": 1}]


@pytest.fixture(autouse=True)
def _bounded_memory():
    """Cap the address space 4 GiB above what the process maps now: a runaway allocation fails, it does not swap."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    limit = vm + 4 * 2**30
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _record(target: str, tmp: Path, exc: BaseException | None, case: str) -> None:
    """Assert the outcome is a success or a one-line WorkbenchError; remember its message."""
    if exc is None:
        OUTCOMES.append((target, "ok"))
        return
    assert isinstance(exc, WorkbenchError), f"{target} case {case}: {type(exc).__name__}: {exc}"
    message = str(exc)
    assert message and "\n" not in message, f"{target} case {case}: not one line: {message!r}"
    assert "Traceback" not in message
    OUTCOMES.append((target, _normalised(message, tmp)))


def _normalised(message: str, tmp: Path) -> str:
    """The message with the temporary directory and the case's own file names taken out (for counting)."""
    return re.sub(r"(case|out)\d+", r"\1N", message.replace(str(tmp), "<tmp>"))


def _run(target: str, tmp: Path, case: str, fn) -> object | None:
    try:
        result = fn()
    except MemoryError as exc:  # the address-space cap caught an allocation the input asked for
        raise AssertionError(f"{target} case {case}: allocated beyond the memory cap") from exc
    except Exception as exc:  # noqa: BLE001 - the assertion below is the point
        _record(target, tmp, exc, case)
        return None
    _record(target, tmp, None, case)
    return result


# ------------------------------------------------------------------------------------------- GGUF


def _gguf_value_offsets(data: bytes) -> dict[str, tuple[int, int]]:
    """Return key -> (offset of its value, GGUF value type) for the scalar metadata of a GGUF file."""
    offsets, pos = {}, 24  # magic, version, n_tensors, n_kv
    n_kv = struct.unpack_from("<Q", data, 16)[0]
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    for _ in range(n_kv):
        (n,) = struct.unpack_from("<Q", data, pos)
        key = data[pos + 8 : pos + 8 + n].decode()
        pos += 8 + n
        (vtype,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if vtype in sizes:
            offsets[key] = (pos, vtype)
            pos += sizes[vtype]
        elif vtype == 8:  # string
            (n,) = struct.unpack_from("<Q", data, pos)
            pos += 8 + n
        else:  # array: element type, count, elements
            etype, count = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if etype == 8:
                for _ in range(count):
                    (n,) = struct.unpack_from("<Q", data, pos)
                    pos += 8 + n
            else:
                pos += sizes[etype] * count
    return offsets


@pytest.fixture(scope="module")
def tiny_gguf_bytes(tmp_path_factory) -> bytes:
    from gguf_files import write_tiny_gguf

    path, _, _ = write_tiny_gguf(tmp_path_factory.mktemp("fuzz-gguf") / "tiny.gguf", quantize=True)
    return path.read_bytes()


def test_gguf_reader_on_mutated_files(tiny_gguf_bytes, tmp_path):
    from workbench.gguf import read_gguf

    rng = random.Random(SEED)
    fields = {k: v for k, v in _gguf_value_offsets(tiny_gguf_bytes).items() if k.startswith("llama.")}
    assert "llama.block_count" in fields and "llama.attention.layer_norm_rms_epsilon" in fields
    for i in range(CASES["gguf"]):
        data = bytearray(tiny_gguf_bytes)
        kind = rng.choice(["field", "field", "field", "flip", "truncate"])
        if kind == "field":  # a metadata number replaced by a hostile one
            key = rng.choice(sorted(fields))
            offset, vtype = fields[key]
            if vtype == 6:  # float32
                struct.pack_into("<f", data, offset, rng.choice([-1.0, 0.0, math.nan, math.inf, 1e-30, 1e30, 1e-5]))
            else:
                width = {4: 4, 5: 4, 10: 8, 11: 8}.get(vtype, 4)
                value = rng.choice([0, 1, 2, 3, 4, 7, 64, 2**16, 10**9, 2**32 - 1]) % (2 ** (8 * width))
                data[offset : offset + width] = value.to_bytes(width, "little")
            case = f"{i}: {key} mutated"
        elif kind == "flip":  # a byte of the header changed
            at = rng.randrange(0, min(len(data), 4096))
            data[at] ^= 1 << rng.randrange(8)
            case = f"{i}: bit flip at byte {at}"
        else:
            cut = rng.randrange(0, len(data))
            data = data[:cut]
            case = f"{i}: truncated to {cut} bytes"
        path = tmp_path / f"case{i}.gguf"
        path.write_bytes(bytes(data))
        ckpt = _run("gguf", tmp_path, case, lambda: read_gguf(path))
        if ckpt is not None:  # a file that reads gives tensors of the shapes its config names
            c = ckpt.hf_config
            assert tuple(ckpt.state_dict["model.embed_tokens.weight"].shape) == (c.vocab_size, c.hidden_size), case
            layers = {k.split(".")[2] for k in ckpt.state_dict if k.startswith("model.layers.")}
            assert len(layers) == c.num_hidden_layers
        path.unlink()


# ------------------------------------------------------------------------------ native checkpoints


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> Path:
    from helpers import LLAMA_TINY, tiny_cfg

    from workbench import HookedGPT

    out = tmp_path_factory.mktemp("fuzz-ckpt") / "model"
    HookedGPT(tiny_cfg(**LLAMA_TINY)).save(out)
    return out


def _mutate_json(rng: random.Random, obj):
    """Return a copy of a JSON object with one field replaced, deleted or retyped, somewhere inside."""
    obj = json.loads(json.dumps(obj))
    target = obj
    while True:
        if isinstance(target, dict):
            keys = list(target)
        else:
            keys = list(range(len(target))) if isinstance(target, list) else []
        if not keys:
            return rng.choice(_NASTY_JSON)
        key = rng.choice(keys)
        if isinstance(target[key], (dict, list)) and target[key] and rng.random() < 0.6:
            target = target[key]
            continue
        if isinstance(target, dict) and rng.random() < 0.25:
            del target[key]
        else:
            target[key] = rng.choice(_NASTY_JSON)
        return obj


def test_checkpoint_loader_on_mutated_config_and_weights(checkpoint_dir, tmp_path):
    from workbench import HookedGPT

    rng = random.Random(SEED + 1)
    config = json.loads((checkpoint_dir / "config.json").read_text())
    weights = (checkpoint_dir / "model.safetensors").read_bytes()
    (header_len,) = struct.unpack_from("<Q", weights, 0)
    for i in range(CASES["checkpoint"]):
        case_dir = tmp_path / f"case{i}"
        shutil.copytree(checkpoint_dir, case_dir)
        kind = rng.choice(["config", "config", "config", "config-bytes", "header", "truncate"])
        if kind == "config":
            text = json.dumps(_mutate_json(rng, config))
            (case_dir / "config.json").write_text(text)
            case = f"{i}: config.json = {text[:200]}"
        elif kind == "config-bytes":
            raw = (checkpoint_dir / "config.json").read_bytes()
            cut = rng.randrange(0, len(raw))
            (case_dir / "config.json").write_bytes(raw[:cut] + rng.choice([b"", b"\xff", b"\x00", b"}"]))
            case = f"{i}: config.json cut at {cut}"
        elif kind == "header":  # the safetensors header: its length or a byte of its JSON
            data = bytearray(weights)
            at = rng.randrange(0, 8 + header_len)
            data[at] = rng.randrange(256)
            (case_dir / "model.safetensors").write_bytes(bytes(data))
            case = f"{i}: safetensors byte {at} set"
        else:
            cut = rng.randrange(0, len(weights))
            (case_dir / "model.safetensors").write_bytes(weights[:cut])
            case = f"{i}: safetensors cut at {cut}"
        model = _run("checkpoint", tmp_path, case, lambda: HookedGPT.load(case_dir))
        if model is not None:  # what loads is the model its config describes, and it runs
            assert model.cfg.n_layers == len(model.blocks), case
            with torch.no_grad():
                logits = model(torch.zeros(1, 3, dtype=torch.long))
            assert logits.shape == (1, 3, model.cfg.d_vocab), case
        shutil.rmtree(case_dir)


# ----------------------------------------------------------------------------------- store manifest


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    from workbench.model import GPTConfig, HookedGPT
    from workbench.store import StoreConfig, write_store

    torch.manual_seed(0)
    model = HookedGPT(GPTConfig(d_model=16, n_layers=1, n_heads=2, d_mlp=32, d_vocab=40, n_ctx=8)).eval()
    windows = torch.randint(0, 40, (12, 8), generator=torch.Generator().manual_seed(1))
    out = tmp_path_factory.mktemp("fuzz-store") / "store"
    write_store(model, windows, out, StoreConfig(hooks=("blocks.0.hook_resid_post",), batch_windows=2, shard_tokens=32))
    return out


def test_store_open_and_read_on_mutated_manifests_and_shards(store_dir, tmp_path):
    from workbench.store import ActivationStore

    rng = random.Random(SEED + 2)
    manifest = json.loads((store_dir / "manifest.json").read_text())
    hook = "blocks.0.hook_resid_post"
    for i in range(CASES["store"]):
        case_dir = tmp_path / f"case{i}"
        shutil.copytree(store_dir, case_dir)
        kind = rng.choice(["manifest", "manifest", "manifest", "shard-cut", "shard-bytes"])
        if kind == "manifest":
            text = json.dumps(_mutate_json(rng, manifest))
            (case_dir / "manifest.json").write_text(text)
            case = f"{i}: manifest = {text[:300]}"
        else:
            shard = rng.choice(sorted(p for p in case_dir.iterdir() if p.is_dir()))
            f = rng.choice(sorted(shard.iterdir()))
            data = f.read_bytes()
            if kind == "shard-cut":
                f.write_bytes(data[: rng.randrange(0, len(data))])
            else:
                b = bytearray(data)
                b[rng.randrange(len(b))] ^= 0xFF
                f.write_bytes(bytes(b))
            case = f"{i}: {kind} {f.relative_to(case_dir)}"
        verify = rng.random() < 0.5

        def open_and_read():
            store = ActivationStore.open(case_dir, verify=verify)
            acts = store.acts(hook)
            assert acts.shape[0] == store.n_rows and acts.shape[1] == store.d_in(hook)
            assert store.tokens().shape[0] == store.n_rows
            return store

        _run("store", tmp_path, case + f" (verify={verify})", open_and_read)
        shutil.rmtree(case_dir)


# --------------------------------------------------------------------------------- CLI numeric flags

#: (subcommand argv before the flag, flag, whether a valid value runs quickly enough to run it)
_CLI = [
    (["induction", "attn-only-1l", "--seq-len", "4"], "--batch", True),
    (["induction", "attn-only-1l", "--batch", "2", "--seq-len", "4"], "--top", True),
    (["induction", "attn-only-1l", "--batch", "2"], "--seq-len", True),
    (["lens", "attn-only-1l", "1 2 3"], "--k", False),
    (["generate", "attn-only-1l", "x", "-n", "2"], "--temperature", False),
    (["generate", "attn-only-1l", "x", "-n", "2", "-t", "1"], "--top-p", False),
    (["generate", "attn-only-1l", "x", "-n", "2"], "--top-k", False),
    (["train-sae", "--synthetic", "--steps", "1", "--out", "OUT"], "--lr", False),
    (["train-sae", "--synthetic", "--steps", "1", "--out", "OUT"], "--d-sae", False),
    (["train-sae", "--synthetic", "--out", "OUT"], "--steps", False),
    (["train-sae", "--synthetic", "--steps", "1", "--out", "OUT"], "--batch-size", False),
    (["cache", "kjv-small", "--hooks", "blocks.0.hook_resid_post"], "--tokens", False),
    (["cache", "kjv-small", "--hooks", "blocks.0.hook_resid_post", "--tokens", "64"], "--n-ctx", False),
    (["tuned-lens", "train", "attn-only-1l", "--out", "OUT"], "--lr", False),
    (["probe", "attn-only-1l"], "--test-fraction", False),
]
_BAD_VALUES = ["0", "-1", "-10", "nan", "inf", "-inf", "1e8x", "abc", "", "0x10", "1e-300", "-0.0", "9" * 30,
               "1e999", "3.5", "\u0661"]


def _cli(argv: list[str]) -> tuple[int, str]:
    from workbench.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse's own usage errors
            rc = exc.code if isinstance(exc.code, int) else 2
    return rc, err.getvalue()


def test_cli_numeric_flags_with_generated_values(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    rng = random.Random(SEED + 3)
    for i in range(CASES["cli"]):
        prefix, flag, cheap = rng.choice(_CLI)
        value = str(rng.choice([1, 2])) if cheap and rng.random() < 0.1 else rng.choice(_BAD_VALUES)
        argv = [a.replace("OUT", str(tmp_path / f"out{i}")) for a in prefix] + [f"{flag}={value}"]
        case = f"{i}: workbench {' '.join(argv)}"
        rc, err = _cli(argv)
        lines = [line for line in err.splitlines() if line.strip()]
        if rc == 0:
            OUTCOMES.append(("cli", "ok"))
            continue
        assert rc in (1, 2), f"{case}: exit {rc}"
        assert "Traceback" not in err, f"{case}: {err}"
        # ours: one line "error: ..."; argparse's: a usage line, then "workbench ...: error: ..."
        errors = [line for line in lines if "error:" in line]
        assert len(errors) == 1 and errors[0] == lines[-1], f"{case}: {err!r}"
        assert not (tmp_path / f"out{i}").exists() or not any((tmp_path / f"out{i}").iterdir()), case
        OUTCOMES.append(("cli", _normalised(re.sub(r"^.*?error: ", "error: ", errors[0]), tmp_path)))


def summary() -> str:
    """Return the number of cases per target and the distinct error messages, with counts."""
    targets = Counter(t for t, _ in OUTCOMES)
    ok = Counter(t for t, m in OUTCOMES if m == "ok")
    messages = Counter(m for _, m in OUTCOMES if m != "ok")
    lines = [f"{sum(targets.values())} generated cases; {len(messages)} distinct error messages"]
    lines += [f"  {t}: {n} cases, {ok[t]} correct results, {n - ok[t]} one-line errors"
              for t, n in sorted(targets.items())]
    lines += [f"  [{n:3d}x] {m}" for m, n in messages.most_common()]
    return "\n".join(lines)


if __name__ == "__main__":
    code = pytest.main([__file__, "-q", "-p", "no:cacheprovider"])
    ran = sys.modules.get("test_fuzz") or sys.modules.get("tests.test_fuzz")  # the copy pytest imported and ran
    print(ran.summary() if ran is not None else summary())
    sys.exit(code)
