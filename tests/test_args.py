"""The CLI's one validation layer (workbench/commands/_args.py): every bad value of item 8/9 of issue 13 is one line."""

from __future__ import annotations

import argparse
import errno
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from workbench import cli
from workbench.commands._args import ConfigFlags

REPO = Path(__file__).resolve().parent.parent


def _run(capsys, *argv: str) -> tuple[int, str]:
    try:
        rc = cli.main(list(argv))
    except SystemExit as exc:  # argparse's own usage errors
        rc = exc.code
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.mark.parametrize("argv,message", [
    (["induction", "attn-only-1l", "--batch", "0"], "--batch 0 is out of range: expected a number above 0"),
    (["lens", "attn-only-1l", "x", "--k", "0"], "--k 0 is out of range"),
    (["train-sae", "--synthetic", "--lr", "-1"], "--lr -1.0 is out of range"),
    (["train-sae", "--synthetic", "--lr", "nan"], "--lr nan is not a finite number"),
    (["train-sae", "--synthetic", "--d-sae", "0"], "--d-sae 0 is out of range"),
    (["train-sae", "--synthetic", "--d-sae", "100000000"], "--d-sae 100000000 with d_in 64 needs about"),
    (["cache", "kjv-small", "--hooks", "blocks.0.hook_resid_post", "--tokens", "0"], "--tokens 0 is out of range"),
    (["cache", "kjv-small", "--hooks", "blocks.0.hook_resid_post", "--tokens", "-10"], "--tokens -10 is out of range"),
    (["generate", "attn-only-1l", "x", "--device", "banana"], "--device 'banana' is not a device"),
    (["generate", "attn-only-1l", "x", "-t", "nan"], "--temperature nan is not a finite number"),
    (["generate", "attn-only-1l", "x", "--top-p", "1.5"], "--top-p 1.5 is out of range: expected a fraction in (0, 1]"),
    (["induction", "attn-only-1l", "--seed", str(10**30)], "is too large to mean anything here"),
])
def test_bad_values_are_one_line_errors_before_anything_runs(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    rc, err = _run(capsys, *argv)
    assert rc == 1 and err.startswith("error: ") and message in err and "\n" not in err, err
    assert not any(tmp_path.iterdir())  # nothing written (no run directory, no store)


def test_cuda_without_cuda_is_one_line(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, err = _run(capsys, "generate", "attn-only-1l", "x", "--device", "cuda")
    assert rc == 1 and err == ("error: --device cuda: this machine has no CUDA GPU (or torch was built without CUDA); "
                               "use --device cpu")


def test_non_utf8_argv_is_one_line():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "workbench.cli", "generate", "attn-only-1l", b"\xff\xfe"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: argument 3 (b'\\xff\\xfe') is not valid UTF-8; pass text in UTF-8 (check the terminal's locale)")


def test_an_output_path_naming_a_file_is_one_line(capsys, tmp_path):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    for argv in (["induction", "attn-only-1l", "--batch", "2", "--seq-len", "4", "--report", str(a_file)],
                 ["induction", "attn-only-1l", "--batch", "2", "--seq-len", "4", "--json", str(a_file / "x.json")]):
        rc, err = _run(capsys, *argv)
        assert rc == 1 and "a file stands where a directory is needed" in err and "\n" not in err, err
    rc, err = _run(capsys, "train-sae", "--synthetic", "--steps", "1", "--out", str(a_file))
    assert rc == 1 and err == f"error: the output {a_file} is a file, not a directory; choose another --out"


@pytest.mark.parametrize("code,reason", [(errno.ENOSPC, "the disk is full"),
                                         (errno.EROFS, "the file system is read-only"),
                                         (errno.EACCES, "permission denied")])
def test_full_or_read_only_disk_under_json_is_one_line_and_leaves_no_half_file(
    capsys, tmp_path, monkeypatch, code, reason
):
    real = Path.write_text

    def failing(self, text, *args, **kwargs):
        if self.name.endswith(".json.tmp"):
            real(self, text[:10])  # what a full disk leaves: the start of the file
            raise OSError(code, os.strerror(code), str(self))
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", failing)
    out = tmp_path / "n.json"
    rc, err = _run(capsys, "induction", "attn-only-1l", "--batch", "2", "--seq-len", "4", "--json", str(out))
    assert rc == 1 and reason in err and "choose another location" in err and "\n" not in err, err
    assert list(tmp_path.iterdir()) == []  # neither n.json nor its temporary file


def test_a_second_tuned_lens_run_on_one_out_fails_at_once(capsys, tmp_path):
    """One writer per output directory, for `tuned-lens train --out` as for cache/train/train-sae."""
    from workbench.locking import output_lock

    out = tmp_path / "lens"
    with output_lock(out):  # the first writer, here in this thread: another job of this process
        import threading

        result = {}
        t = threading.Thread(target=lambda: result.update(rc=cli.main(
            ["tuned-lens", "train", "attn-only-1l", "--out", str(out), "--steps", "1", "--windows", "2"])))
        t.start()
        t.join(60)
    err = capsys.readouterr().err
    assert result["rc"] == 1 and f"is writing {out}; wait for it to finish or choose another --out" in err
    assert list(out.iterdir()) == []


# --------------------------------------------------------------------------------- flags from config dataclasses


@dataclass(frozen=True)
class _Cfg:
    """A config with one field of each kind a flag is made for."""

    total_steps: int
    """Steps to run."""
    lr: float = 1e-3
    """Peak learning rate."""
    kind: Literal["a", "b"] = "a"
    """Which kind."""
    aux: int | None = None
    betas: tuple[float, float] = (0.9, 0.99)
    progress: bool = True
    """Show a bar."""


def test_every_commands_help_renders():
    """Flag help comes from field docstrings, which may hold a literal '%' (argparse formats help with %)."""
    from workbench.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert len(commands.choices) > 10
    for name, sub in commands.choices.items():
        assert f"{name}" in sub.format_help()

    @dataclass
    class Percent:
        share: float = 0.3
        """Decays over the last 30% of the steps."""

    p = argparse.ArgumentParser()
    ConfigFlags(Percent).add_to(p)
    assert "the last 30% of the steps" in p.format_help()


def test_config_flags_come_from_the_dataclass_and_round_trip():
    import argparse

    flags = ConfigFlags(_Cfg, names={"total_steps": "steps"}, defaults={"total_steps": 10})
    parser = argparse.ArgumentParser()
    flags.add_to(parser, title="training")
    helptext = " ".join(parser.format_help().split())
    assert "training: --steps STEPS Steps to run. (default: 10)" in helptext
    assert "--lr LR Peak learning rate. (default: 0.001)" in helptext and "--kind {a,b} Which kind." in helptext
    assert flags.build(parser.parse_args([])) == _Cfg(total_steps=10)
    argv = ["--steps", "5", "--lr", "0.5", "--kind", "b", "--aux", "3", "--betas", "0.8", "0.9", "--no-progress"]
    cfg = flags.build(parser.parse_args(argv))
    assert cfg == _Cfg(total_steps=5, lr=0.5, kind="b", aux=3, betas=(0.8, 0.9), progress=False)
    assert flags.argv(cfg) == argv
    assert flags.build(parser.parse_args(flags.argv(cfg))) == cfg
    with pytest.raises(SystemExit):  # a Literal field's choices are checked by argparse
        parser.parse_args(["--kind", "c"])


def test_config_flags_name_unknown_fields_and_keep_required_ones_required():
    import argparse

    with pytest.raises(TypeError, match=r"_Cfg has no field\(s\) \['step'\]"):
        ConfigFlags(_Cfg, names={"step": "steps"})
    parser = argparse.ArgumentParser()
    ConfigFlags(_Cfg, only=("total_steps", "lr")).add_to(parser)
    with pytest.raises(SystemExit):  # no default anywhere: the flag is required
        parser.parse_args(["--lr", "1"])
    assert vars(parser.parse_args(["--total-steps", "3"])) == {"total_steps": 3, "lr": 1e-3}


@pytest.mark.parametrize("argv", [
    ["features", "NO_SAE", "--store", "NO_STORE", "--out", "{out}"],
    ["probe", "attn-only-1l", "--dataset", "truth", "--save", "{out}"],
])
def test_a_second_writer_of_features_out_or_probe_save_fails_at_once(capsys, tmp_path, argv):
    """`features --out` and `probe --save` write several files into one directory: one writer at a time,
    refused before any slow work (here the SAE and store do not even exist, so only the lock can answer)."""
    import threading

    from workbench.locking import output_lock

    out = tmp_path / "out"
    argv = [a.replace("{out}", str(out)) for a in argv]
    with output_lock(out):
        result = {}
        t = threading.Thread(target=lambda: result.update(rc=cli.main(argv)))
        t.start()
        t.join(60)
    err = capsys.readouterr().err
    assert result["rc"] == 1 and f"is writing {out}; wait for it to finish or choose another --out" in err, err
    assert list(out.iterdir()) == []
