"""Activation store: exact round trip, traceability, crash-safe resume, bad input, shuffled reader."""

from __future__ import annotations

import errno
import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench import store as store_mod
from workbench.distributed import DistInfo
from workbench.errors import ConfigError, DataError
from workbench.model import GPTConfig, HookedGPT
from workbench.store import ActivationStore, ReaderConfig, StoreConfig, stop_layer, write_store

HOOKS = ("blocks.0.hook_resid_post", "blocks.0.mlp.hook_post", "blocks.0.attn.hook_z")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors on shared cores
CFG = GPTConfig(d_model=32, n_layers=2, n_heads=4, d_head=8, d_mlp=64, d_vocab=101, n_ctx=16)


@pytest.fixture(scope="module")
def model() -> HookedGPT:
    torch.manual_seed(1)
    return HookedGPT(CFG).eval()


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    return torch.randint(0, CFG.d_vocab, (26, CFG.n_ctx), generator=torch.Generator().manual_seed(2))


def small(**kw) -> StoreConfig:
    return StoreConfig(**{"hooks": HOOKS, "batch_windows": 3, "shard_tokens": 90, **kw})


def same_tree(a: Path, b: Path) -> bool:
    """True when two directories hold the same file names with identical bytes."""
    fa = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    fb = sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    return fa == fb and all(filecmp.cmp(a / f, b / f, shallow=False) for f in fa)


def test_round_trip_equals_run_with_cache_and_rows_trace_back(model, windows, tmp_path):
    res = write_store(model, windows, tmp_path / "s", small(first_position=1), model_name="tiny")
    store = ActivationStore.open(tmp_path / "s", verify=True)
    assert res.shards_written == len(store.shards) > 2  # several shards, so boundaries are exercised
    assert store.n_rows == windows.shape[0] * (CFG.n_ctx - 1) == res.n_rows
    _, cache = model.run_with_cache(windows, names_filter=list(HOOKS))
    for hook in HOOKS:
        ref = cache[hook][:, 1:].reshape(store.n_rows, -1)
        assert torch.equal(store.acts(hook), ref), hook
        assert torch.equal(store.acts(hook, 17, 70), ref[17:70])  # a slice across a shard boundary
    # every row leads back to its token
    tok, pos, win = store.tokens(), store.positions(), store.window_index()
    assert torch.equal(store.windows(), windows)
    assert torch.equal(windows[win, pos], tok)
    assert pos.min() == 1 and store.row_of(5, 3) == int(((win == 5) & (pos == 3)).nonzero())
    assert store.d_in("blocks.0.attn.hook_z") == CFG.n_heads * CFG.d_head
    man = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert man["model"]["name"] == "tiny" and man["complete"]
    assert man["hooks"]["blocks.0.mlp.hook_post"]["shape"] == [64]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_dtypes_are_the_cast_activations(model, windows, tmp_path, dtype):
    write_store(model, windows[:6], tmp_path / dtype, small(dtype=dtype, hooks=HOOKS[:1]))
    store = ActivationStore.open(tmp_path / dtype)
    _, cache = model.run_with_cache(windows[:6], names_filter=HOOKS[:1])
    tdt = getattr(torch, dtype)
    ref = cache[HOOKS[0]].to(tdt).reshape(-1, CFG.d_model)
    got = store.acts(HOOKS[0], dtype=None)
    assert got.dtype == tdt and torch.equal(got, ref)


def test_stop_layer_skips_unneeded_blocks():
    assert stop_layer(["blocks.0.hook_resid_post", "blocks.3.mlp.hook_post"]) == 4
    assert stop_layer(["hook_embed"]) == 0
    assert stop_layer(["ln_final.hook_normalized"]) is None


def test_killed_run_resumes_to_the_same_bytes(model, windows, tmp_path):
    write_store(model, windows, tmp_path / "whole", small())

    class Killed(Exception):
        pass

    def kill_after_two(index: int) -> None:
        if index == 1:
            raise Killed

    with pytest.raises(Killed):
        write_store(model, windows, tmp_path / "resumed", small(), on_shard=kill_after_two)
    man = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert not man["complete"] and len(man["shards"]) == 2
    with pytest.raises(DataError, match="incomplete"):
        ActivationStore.open(tmp_path / "resumed")
    # what a kill at the worst moments leaves behind: a half-written shard and a renamed, unlisted one
    (tmp_path / "resumed" / "shard-r0-00002.tmp").mkdir()
    (tmp_path / "resumed" / "shard-r0-00002.tmp" / "tokens.npy").write_bytes(b"garbage")
    (tmp_path / "resumed" / "shard-r0-00003").mkdir()
    (tmp_path / "resumed" / "shard-r0-00003" / "tokens.npy").write_bytes(b"garbage")

    res = write_store(model, windows, tmp_path / "resumed", small())
    n_shards = len(ActivationStore.open(tmp_path / "whole").shards)
    assert res.shards_skipped == 2 and res.shards_written == n_shards - 2
    assert same_tree(tmp_path / "whole", tmp_path / "resumed")
    # a finished store is left alone
    again = write_store(model, windows, tmp_path / "resumed", small())
    assert again.shards_written == 0


def test_sigkilled_subprocess_resumes_to_the_same_bytes(model, windows, tmp_path):
    """A real SIGKILL inside the forward of the third shard leaves nothing a resume trips on."""
    torch.save({"state": model.state_dict(), "windows": windows}, tmp_path / "inputs.pt")
    script = textwrap.dedent(
        f"""
        import os, signal, sys, torch
        from workbench.model import GPTConfig, HookedGPT
        from workbench.store import StoreConfig, write_store
        d = torch.load({str(tmp_path / 'inputs.pt')!r})
        m = HookedGPT(GPTConfig(**{CFG.to_dict()!r})).eval()
        m.load_state_dict(d["state"])
        calls = [0]
        def die(x, hook):
            calls[0] += 1
            if calls[0] == 9 and sys.argv[1] == "kill":  # probe + 2 shards of 3 batches, then mid-shard
                os.kill(os.getpid(), signal.SIGKILL)
        m.hook_dict["blocks.0.hook_resid_post"].add(die)
        write_store(m, d["windows"], sys.argv[2], StoreConfig(hooks={HOOKS!r}, batch_windows=3, shard_tokens=90))
        """
    )
    (tmp_path / "job.py").write_text(script)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    killed = subprocess.run([sys.executable, tmp_path / "job.py", "kill", tmp_path / "k"], env=env)
    assert killed.returncode == -signal.SIGKILL
    assert any(p.name.endswith(".tmp") for p in (tmp_path / "k").iterdir())  # it died mid-shard
    write_store(model, windows, tmp_path / "k", small())
    write_store(model, windows, tmp_path / "whole", small())
    assert same_tree(tmp_path / "whole", tmp_path / "k")


def test_store_of_another_model_or_hook_is_refused(model, windows, tmp_path):
    write_store(model, windows[:6], tmp_path / "s", small())
    other = HookedGPT(CFG)  # same config, other weights
    with pytest.raises(DataError, match="different activation store"):
        write_store(other, windows[:6], tmp_path / "s", small())
    with pytest.raises(DataError, match="different activation store"):
        write_store(model, windows[:6], tmp_path / "s", small(hooks=HOOKS[:1]))
    with pytest.raises(DataError, match="different activation store"):
        write_store(model, windows[:5], tmp_path / "s", small())
    store = ActivationStore.open(tmp_path / "s")
    store.check_model(model)
    with pytest.raises(DataError, match="other weights"):
        store.check_model(other)
    with pytest.raises(DataError, match="another model"):
        store.check_model(HookedGPT(GPTConfig(**{**CFG.to_dict(), "d_mlp": 32})))
    with pytest.raises(DataError, match="holds no hook"):
        store.check_hook("blocks.1.hook_resid_post")
    with pytest.raises(DataError, match="d_in 32, the SAE expects 64"):
        store.check_hook("blocks.0.hook_resid_post", d_in=64)


def test_truncated_or_corrupted_shard_is_detected(model, windows, tmp_path):
    write_store(model, windows[:6], tmp_path / "s", small())
    f = tmp_path / "s" / "shard-r0-00000" / "blocks.0.hook_resid_post.npy"
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    with pytest.raises(DataError, match="truncated"):
        ActivationStore.open(tmp_path / "s")
    f.write_bytes(data[:-4] + b"\x00\x00\xc0\x7f")  # same size, last value now NaN
    ActivationStore.open(tmp_path / "s")  # sizes match: a cheap open passes ...
    with pytest.raises(DataError, match="checksum"):
        ActivationStore.open(tmp_path / "s", verify=True)  # ... the checksum does not


def test_non_finite_activations_are_refused_and_nothing_is_listed(model, windows, tmp_path):
    def poison(x, hook):
        y = x.clone()
        if y.shape[1] > 4:  # not the two-token shape probe
            y[0, 4, 0] = float("nan")
        return y

    with model.hooks([("blocks.0.hook_resid_post", poison)]):
        with pytest.raises(DataError, match=r"NaN or Inf.*blocks.0.hook_resid_post.*window 0, position 4"):
            write_store(model, windows[:6], tmp_path / "s", small())
    assert [p.name for p in (tmp_path / "s").iterdir()] == []
    # float16 overflow is caught too
    big = lambda x, hook: x * 1e6  # noqa: E731
    with model.hooks([("blocks.0.hook_resid_post", big)]):
        with pytest.raises(DataError, match="float16 overflows"):
            write_store(model, windows[:6], tmp_path / "h", small(dtype="float16"))


def test_full_disk_loses_nothing_and_resumes(model, windows, tmp_path, monkeypatch):
    write_store(model, windows, tmp_path / "whole", small())
    real_write = store_mod._HashingFile.write
    budget = [40_000]

    def filling_write(self, data):
        budget[0] -= len(data)
        if budget[0] < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, data)

    monkeypatch.setattr(store_mod._HashingFile, "write", filling_write)
    with pytest.raises(DataError, match="disk .* is full"):
        write_store(model, windows, tmp_path / "s", small())
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "s").iterdir())
    monkeypatch.setattr(store_mod._HashingFile, "write", real_write)
    write_store(model, windows, tmp_path / "s", small())
    assert same_tree(tmp_path / "whole", tmp_path / "s")


def test_too_little_free_space_is_refused_up_front(model, windows, tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(DataError, match="GiB are free"):
        write_store(model, windows, tmp_path / "s", small())


def test_bad_configs_and_inputs(model, windows, tmp_path):
    with pytest.raises(ConfigError, match="not laid out per position"):
        StoreConfig(hooks=("blocks.0.attn.hook_pattern",))
    with pytest.raises(ConfigError, match="dtype"):
        StoreConfig(hooks=HOOKS, dtype="int8")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="integer tensor"):
        write_store(model, windows.float(), tmp_path / "s", small())
    with pytest.raises(DataError, match="vocabulary has 101"):
        write_store(model, windows + 100, tmp_path / "s", small())


# -- the shuffled reader ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(model, windows, tmp_path_factory) -> ActivationStore:
    path = tmp_path_factory.mktemp("reader") / "s"
    write_store(model, windows, path, small())
    return ActivationStore.open(path)


def test_an_epoch_is_a_permutation_of_all_rows(store):
    cfg = ReaderConfig(batch_size=32, buffer_rows=100, block_rows=20, seed=3, drop_last=False)
    hook = HOOKS[0]
    batches = list(store.batches(hook, cfg, epoch=0))
    got = torch.cat(batches)
    ref = store.acts(hook)
    assert got.shape == ref.shape and all(b.shape[0] == 32 for b in batches[:-1])
    assert torch.equal(got[torch.argsort(got[:, 0])], ref[torch.argsort(ref[:, 0])])
    assert not torch.equal(got, ref)  # actually shuffled ...
    first_rows = got[:100]
    # ... and across shards: the first buffer mixes rows of more than one shard
    idx = [int((ref == r).all(1).nonzero()[0]) for r in first_rows]
    shard_of = np.searchsorted(store._offsets(), idx, side="right") - 1
    assert len(set(shard_of.tolist())) > 1
    other_epoch = torch.cat(list(store.batches(hook, cfg, epoch=1)))
    assert not torch.equal(other_epoch, got)
    assert torch.equal(torch.cat(list(store.batches(hook, cfg, epoch=0))), got)  # deterministic


def test_buffers_stay_within_the_memory_bound(store):
    cfg = ReaderConfig(batch_size=32, buffer_rows=100, block_rows=20)
    groups = store._groups(cfg, epoch=0)
    assert len(groups) > 3 and max(sum(hi - lo for _, lo, hi in g) for g in groups) <= 100


def test_reader_resumes_by_offset(store, monkeypatch):
    cfg = ReaderConfig(batch_size=32, buffer_rows=100, block_rows=20, seed=5)
    hook = HOOKS[1]
    full = list(store.batches(hook, cfg, epoch=2))
    assert len(full) == store.n_rows // 32
    resumed = list(store.batches(hook, cfg, epoch=2, offset=5 * 32))
    assert len(resumed) == len(full) - 5 and all(torch.equal(a, b) for a, b in zip(full[5:], resumed))
    # resuming does not read the buffers it skips
    reads = []
    real = ActivationStore._map
    monkeypatch.setattr(ActivationStore, "_map", lambda self, i, f: reads.append(i) or real(self, i, f))
    next(store.batches(hook, cfg, epoch=2, offset=11 * 32))
    assert len(reads) < len(store._groups(cfg, 2)[0]) * 2
    # the endless stream crosses epochs and resumes from a global row count
    stream = store.stream(hook, cfg)
    seq = [next(stream) for _ in range(len(full) + 3)]
    assert torch.equal(seq[len(full) + 1], list(store.batches(hook, cfg, epoch=1))[1])
    later = store.stream(hook, cfg, start_row=(len(full) + 2) * 32)
    assert torch.equal(next(later), seq[len(full) + 2])


def test_two_ranks_write_the_same_rows_as_one(model, windows, tmp_path, monkeypatch):
    """Under torchrun each rank writes its own shards; rank 0 merges the manifest."""
    write_store(model, windows, tmp_path / "one", small())
    for rank in (1, 0):  # rank 1 finishes first; rank 0 merges after its own shards
        monkeypatch.setattr(store_mod, "dist_info", lambda r=rank: DistInfo(r, 2))
        write_store(model, windows, tmp_path / "two", small())
    one, two = ActivationStore.open(tmp_path / "one"), ActivationStore.open(tmp_path / "two", verify=True)
    assert {s.rank for s in two.shards} == {0, 1}
    for hook in HOOKS:
        assert torch.equal(one.acts(hook), two.acts(hook))
    assert torch.equal(one.tokens(), two.tokens())


def test_torchrun_launch_without_a_process_group_is_refused(model, windows, tmp_path, monkeypatch):
    """With no group joined no barrier holds rank 0 back from merging unfinished manifests: refused up front."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=2.*init_distributed"):
        write_store(model, windows, tmp_path / "s", small())
    assert not (tmp_path / "s").exists()


# --- issue 13: the store's repair advice works; one writer per store


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_rerun_rewrites_a_deleted_or_truncated_shard_as_the_open_error_advises(model, windows, tmp_path, damage):
    write_store(model, windows, tmp_path / "a", small(), model_name="tiny")
    write_store(model, windows, tmp_path / "b", small(), model_name="tiny")
    shard = tmp_path / "b" / "shard-r0-00001"
    f = shard / "blocks.0.hook_resid_post.npy"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(DataError, match="delete that shard directory and rerun `workbench cache`"):
        ActivationStore.open(tmp_path / "b")
    if damage == "delete":
        shutil.rmtree(shard)  # what the message says to do
    res = write_store(model, windows, tmp_path / "b", small(), model_name="tiny")
    assert res.shards_written == 1 and res.shards_skipped == len(ActivationStore.open(tmp_path / "a").shards) - 1
    ActivationStore.open(tmp_path / "b", verify=True)
    assert same_tree(tmp_path / "a", tmp_path / "b")  # the same bytes as an unbroken run, manifest included


def test_a_second_cache_writer_on_one_store_fails_at_once_and_the_first_verifies(model, windows, tmp_path):
    import threading

    from workbench.locking import OutputLockedError

    out = tmp_path / "s"
    errors: list[BaseException] = []

    def second_writer():
        try:
            write_store(model, windows, out, small(), model_name="tiny")
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors.append(exc)

    def after_first_shard(index):  # the first writer holds the store here
        if index == 0:
            t = threading.Thread(target=second_writer)
            t.start()
            t.join()

    write_store(model, windows, out, small(), model_name="tiny", on_shard=after_first_shard)
    assert len(errors) == 1 and isinstance(errors[0], OutputLockedError), errors
    assert f"is writing {out}" in str(errors[0]) and "\n" not in str(errors[0])
    ActivationStore.open(out, verify=True)
    assert not (out / ".lock").exists()


# --- issue 14: the manifest is a dataclass; stores written before it still read

#: A store written by the code before StoreManifest (git d873650: a 1-layer d_model-8 model, 4 windows of 4, first
#: position 1, two shards); its manifest.json is the dict that code wrote.
V1_STORE = Path(__file__).parent / "data" / "store_v1"


def _keys(obj) -> object:
    """The key structure of a JSON value (dict keys in order, recursively; values dropped)."""
    if isinstance(obj, dict):
        return [(k, _keys(v)) for k, v in obj.items() if k != "config"]  # a model config's keys are GPTConfig's
    if isinstance(obj, list):
        return [_keys(v) for v in obj[:1]]
    return None


def test_a_store_written_before_the_manifest_dataclass_reads_and_keeps_its_json(tmp_path):
    store = ActivationStore.open(V1_STORE, verify=True)
    m = store.manifest
    assert isinstance(m, store_mod.StoreManifest) and m.model.name == "tiny" and m.first_position == 1
    assert m.hooks["blocks.0.hook_resid_post"] == store_mod.HookInfo(shape=(8,), d_in=8)
    assert store.acts("blocks.0.hook_resid_post").shape == (12, 8) and store.row_of(3, 1) == 9
    assert m.to_json() == json.loads((V1_STORE / "manifest.json").read_text())  # key for key, value for value
    # what this code writes has the same layout, key order included
    torch.manual_seed(0)
    tiny = HookedGPT(GPTConfig(d_model=8, n_layers=1, n_heads=2, d_mlp=16, d_vocab=20, n_ctx=4)).eval()
    w = torch.randint(0, 20, (4, 4), generator=torch.Generator().manual_seed(1))
    write_store(tiny, w, tmp_path / "new", StoreConfig(hooks=("blocks.0.hook_resid_post",), batch_windows=2,
                                                       shard_tokens=8, first_position=1), model_name="tiny")
    new = json.loads((tmp_path / "new" / "manifest.json").read_text())
    assert _keys(new) == _keys(m.to_json())
    assert torch.equal(ActivationStore.open(tmp_path / "new").windows(), store.windows())


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.pop("n_ctx"), r"manifest.json is damaged \(the manifest lacks the key\(s\) \['n_ctx'\]\)"),
    (lambda m: m["shards"][1].pop("rows"), r"manifest.json is damaged \('shards'\[1\] lacks the key\(s\) \['rows'\]\)"),
    (lambda m: m.update(chunk_size=4),
     r"manifest.json: the manifest has unknown key\(s\) \['chunk_size'\].*another version"),
    (lambda m: m["hooks"]["blocks.0.hook_resid_post"].update(d_model=8),
     r"'hooks'\['blocks.0.hook_resid_post'\] has unknown key\(s\) \['d_model'\]"),
    (lambda m: m["corpus"].update(n_windows="4"), r"'corpus'.n_windows is \"4\", not a count"),
    (lambda m: m.update(complete="yes"), r"'complete' is \"yes\", not true or false"),
    (lambda m: m.update(dtype="float64"), r"'dtype' is \"float64\", not one of \['float16', 'bfloat16', 'float32'\]"),
])
def test_a_manifest_with_a_missing_unknown_or_mistyped_key_is_refused_naming_the_file(tmp_path, edit, message):
    shutil.copytree(V1_STORE, tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    edit(manifest)
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=message) as info:
        ActivationStore.open(tmp_path / "s")
    assert str(tmp_path / "s" / "manifest.json") in str(info.value) and "\n" not in str(info.value)


def test_writing_over_a_damaged_or_foreign_manifest_says_how_to_go_on(model, windows, tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "manifest.json").write_text(json.dumps({"format": "something-else", "version": 3}))
    with pytest.raises(DataError, match=r"is not a workbench-activation-store v1 store.*choose another --out"):
        write_store(model, windows, tmp_path / "s", small())
