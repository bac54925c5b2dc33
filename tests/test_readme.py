"""The README's command lines run as written.

Every line of a README code block that starts with ``workbench `` is run, in the README's order,
through the CLI's own ``main`` in one scratch directory with a fresh ``WORKBENCH_HOME`` (so relative
paths a line writes are what the next line reads, as for a user typing them in one shell). Nothing
in a line is substituted: a README line that needs a placeholder filled in, or that the CLI rejects,
fails here. The scratch home borrows the fetched SmolLM2 and the downloaded corpora of the real
home (read-only links), so nothing is fetched from the network; lines naming SmolLM2 carry the
``smollm2`` marker and are skipped where it is not fetched.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands(text: str | None = None) -> list[str]:
    """Return every ``workbench ...`` command of the README's fenced code blocks, in order (a line ending in a
    backslash continues on the next one; a trailing ``# comment`` is dropped by the shell-like split later)."""
    text = README.read_text(encoding="utf-8") if text is None else text
    commands: list[str] = []
    inside, pending = False, ""
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            inside, pending = not inside, ""
            continue
        if not inside:
            continue
        if pending:
            line = pending + " " + line.strip()
            pending = ""
        elif not line.startswith("workbench "):
            continue
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1].rstrip()
            continue
        commands.append(line.strip())
    return commands


COMMANDS = readme_commands()


def _marks(line: str) -> list:
    return [pytest.mark.smollm2] if "smollm2" in line.lower() else []


def test_the_readme_has_a_cli_section_to_run():
    """The parser finds the commands (a README reshuffle that hid them would otherwise pass silently)."""
    words = {shlex.split(c, comments=True)[1] for c in COMMANDS}
    assert {"models", "run", "generate", "train", "cache", "train-sae", "eval-sae", "features"} <= words, words
    assert readme_commands("```\nworkbench a \\\n  --b 1   # note\nnot this\n```\nworkbench outside\n") == [
        "workbench a --b 1   # note"]


@pytest.fixture(scope="module")
def shell(tmp_path_factory):
    """A scratch working directory and workbench home shared by the README's lines, in order."""
    from workbench import paths

    real = paths.home()
    home = tmp_path_factory.mktemp("readme_home")
    for sub in ("downloads", "models/smollm2-135m"):  # the fetched SmolLM2 and corpora, never written to here
        if (real / sub).exists():
            (home / sub).parent.mkdir(parents=True, exist_ok=True)
            (home / sub).symlink_to(real / sub, target_is_directory=True)
    work = tmp_path_factory.mktemp("readme_cwd")
    return home, work


@pytest.mark.parametrize("line", [pytest.param(c, marks=_marks(c), id=f"{i:02d}-{' '.join(c.split()[1:3])}")
                                  for i, c in enumerate(COMMANDS)])
def test_readme_command_runs_as_written(line, shell, capsys, monkeypatch):
    from workbench.cli import main

    home, work = shell
    monkeypatch.setenv("WORKBENCH_HOME", str(home))
    monkeypatch.chdir(work)
    if "smollm2" in line.lower():
        from workbench import zoo

        if zoo.cache_status(zoo.SMOLLM2.name).state != "ready" and not zoo.source_path(zoo.SMOLLM2).is_file():
            pytest.skip("SmolLM2 is not fetched; `workbench fetch smollm2-135m` (`make test` does)")
    argv = shlex.split(line, comments=True)
    assert argv[0] == "workbench"
    try:
        code = main(argv[1:])
    except SystemExit as exc:  # argparse rejecting the line as written
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 0, f"`{line}` exited {code}:\n{err[-2000:]}"
    assert out.strip() or err.strip(), f"`{line}` printed nothing"
