"""One validation layer for the values the ``workbench`` command is given, applied to every subcommand.

argparse checks that ``--lr`` is a float; this checks that it is a usable one. The rules are keyed by
an option's destination name, which means the same thing in every subcommand (``--batch`` is always
a count of sequences, ``--lr`` always a learning rate), so a new subcommand's flags are checked as
soon as they use the shared names, without a special case per flag. :func:`check_args` runs in
:func:`workbench.cli.main` between parsing and the command; a bad value is a :class:`ConfigError`
naming the flag, the value and what is expected, printed as one line.

Every float, whatever its name, must be finite: ``nan`` and ``inf`` parse as floats but mean nothing
as a learning rate, temperature or multiplier.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import re
from collections.abc import Callable, Sequence

from workbench.errors import ConfigError, InputError

#: a count of things: at least 1
POSITIVE_INTS = frozenset({
    "batch", "batch_size", "d_sae", "dead_tokens", "expansion", "k", "log_every", "max_features", "max_rows",
    "max_windows", "n_ctx", "n_top", "seq_len", "shard_tokens", "steps", "synthetic_d_in", "synthetic_features",
    "tokens", "top", "top_k", "windows", "held_out",
})
#: an offset, a seed or an "every N steps, 0 for never": at least 0
NONNEGATIVE_INTS = frozenset({
    "seed", "warmup_steps", "resample_every", "first_position", "kl_windows", "skip", "checkpoint_every",
    "max_new_tokens", "feature", "layer", "layers",
})
#: rates and amounts that must be above 0
POSITIVE_FLOATS = frozenset({"lr", "synthetic_active"})
#: coefficients and temperatures: 0 allowed (greedy, no penalty)
NONNEGATIVE_FLOATS = frozenset({"temperature", "l1_coefficient", "l0_coefficient"})
#: fractions in (0, 1]
FRACTIONS = frozenset({"top_p", "edge_threshold", "node_threshold"})
#: fractions strictly inside (0, 1): a split needs both sides
OPEN_FRACTIONS = frozenset({"test_fraction"})

#: no count, offset or seed of any command is meaningful above 2**53 (floats stop counting in ones there)
MAX_INT = 2**53

_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


def flag(dest: str) -> str:
    """Return the option string of an argparse destination (``batch_size`` -> ``--batch-size``)."""
    return "--" + dest.replace("_", "-")


def _values(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _rule(dest: str) -> tuple[Callable[[float], bool], str] | None:
    if dest in POSITIVE_INTS or dest in POSITIVE_FLOATS:
        return (lambda v: v > 0), "a number above 0"
    if dest in NONNEGATIVE_INTS or dest in NONNEGATIVE_FLOATS:
        return (lambda v: v >= 0), "a number of at least 0"
    if dest in FRACTIONS:
        return (lambda v: 0 < v <= 1), "a fraction in (0, 1]"
    if dest in OPEN_FRACTIONS:
        return (lambda v: 0 < v < 1), "a fraction strictly between 0 and 1"
    return None


def check_args(args: argparse.Namespace) -> None:
    """Raise ConfigError naming the first value in ``args`` that no command can use."""
    for dest, value in sorted(vars(args).items()):
        if dest == "device" and value is not None:
            check_device(value)
            continue
        rule = _rule(dest)
        for v in _values(value):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{flag(dest)} {v} is not a finite number; give an ordinary number")
            if rule is not None and not rule[0](v):
                raise ConfigError(f"{flag(dest)} {v} is out of range: expected {rule[1]}")
            if isinstance(v, int) and abs(v) > MAX_INT:
                raise ConfigError(f"{flag(dest)} {v} is too large to mean anything here; give at most {MAX_INT}")


def check_device(value: str) -> None:
    """Raise ConfigError unless ``value`` names a device this machine has (cpu, cuda, cuda:N, mps)."""
    if not _DEVICE.match(value):
        raise ConfigError(f"--device {value!r} is not a device; use cpu, cuda, cuda:N or mps")
    import torch

    if value.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {value}: this machine has no CUDA GPU (or torch was built without CUDA); use --device cpu")
        index = int(value.split(":")[1]) if ":" in value else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"--device {value}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                              f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    if value == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps: this machine has no Apple GPU; use --device cpu")


def check_argv(argv: Sequence[str]) -> None:
    """Raise InputError for an argument that is not valid UTF-8 (Python keeps such bytes as surrogates)."""
    for i, arg in enumerate(argv):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            raw = os.fsencode(arg)
            raise InputError(
                f"argument {i + 1} ({raw[:40]!r}) is not valid UTF-8; pass text in UTF-8 (check the terminal's locale)"
            ) from None


#: errors of the file system that a user fixes by choosing another path or freeing space
_PATH_ERRNOS = {
    errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.EROFS: "the file system is read-only",
    errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
    errno.ENOTDIR: "a file stands where a directory is needed", errno.EISDIR: "it is a directory, not a file",
    errno.EEXIST: "a file stands where a directory is needed", errno.ENAMETOOLONG: "the name is too long",
    errno.ENOENT: "no such file or directory",
}


def resource_error_message(exc: BaseException) -> str | None:
    """Return a one-line message for running out of memory or disk, or a bad path; None for any other error."""
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)):
        return ("out of memory: the values given ask for more than this machine has; lower the sizes "
                "(--batch, --tokens, --n-ctx, --d-sae ...) or use a machine with more memory")
    if not isinstance(exc, OSError):
        return None
    reason = _PATH_ERRNOS.get(exc.errno)
    if reason is None:
        return None
    where = f" {exc.filename}" if exc.filename else ""
    way_out = "free space or" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "check the path or"
    return f"cannot use{where}: {reason}; {way_out} choose another location (--out, --json, --report or WORKBENCH_HOME)"
