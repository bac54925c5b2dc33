"""The ``workbench`` command's flags: made from the config dataclasses, and checked in one layer.

:class:`ConfigFlags` gives a config dataclass (``SAETrainConfig``, ``TranscoderRecipe``, ...) one
``--flag`` per field, its type, default and help taken from the field, and builds the config back
from the parsed arguments, so the command line never restates a default.

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
import ast
import errno
import inspect
import math
import os
import re
import textwrap
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

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
    if value.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {value}: this machine has no CUDA GPU (or torch was built without CUDA); "
                              "use --device cpu")
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


# --------------------------------------------------------------------------------------------
# flags from config dataclasses


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass (the string under each field), by field name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


@dataclass(frozen=True)
class ConfigFlags:
    """The ``--flags`` of a config dataclass: one per field, its type, default and help taken from the field.

    A command declares one of these next to its parser and uses it twice: :meth:`add_to` when it
    registers its flags, :meth:`build` when it turns the parsed arguments into the config. So the
    defaults live in the dataclass alone; ``defaults`` is only for a field the dataclass leaves
    required, or where the command deliberately starts elsewhere (say why at the call).
    """

    cls: type
    """The config dataclass."""
    only: tuple[str, ...] | None = None
    """Fields that get a flag (None: all but ``skip``)."""
    skip: tuple[str, ...] = ()
    """Fields that get no flag (the command sets them, or they are not for the command line)."""
    names: Mapping[str, str] = field(default_factory=dict)
    """Field -> flag name where they differ (``{"total_steps": "steps"}`` gives ``--steps``)."""
    defaults: Mapping[str, Any] = field(default_factory=dict)
    """Field -> the command's default where the dataclass has none or the command starts elsewhere."""
    choices: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    """Field -> allowed values, for a field typed ``str`` (``Literal`` fields give their own)."""

    def __post_init__(self) -> None:
        known = {f.name for f in fields(self.cls)}
        named = set(self.only or ()) | set(self.skip) | set(self.names) | set(self.defaults) | set(self.choices)
        if named - known:
            raise TypeError(f"{self.cls.__name__} has no field(s) {sorted(named - known)}; it has {sorted(known)}")

    def fields(self) -> list[Field]:
        """The dataclass fields that get a flag, in declaration order."""
        return [f for f in fields(self.cls)
                if (self.only is None or f.name in self.only) and f.name not in self.skip]

    def dest(self, name: str) -> str:
        """The argparse destination of field ``name`` (``flag(dest)`` is its option string)."""
        return self.names.get(name, name)

    def default(self, f: Field) -> Any:
        if f.name in self.defaults:
            return self.defaults[f.name]
        if f.default is not MISSING:
            return f.default
        if f.default_factory is not MISSING:
            return f.default_factory()
        return MISSING

    def add_to(self, parser: argparse.ArgumentParser | argparse._ArgumentGroup, title: str | None = None) -> None:
        """Add one flag per field to ``parser`` (in an argument group ``title``, when given)."""
        group = parser.add_argument_group(title) if title and isinstance(parser, argparse.ArgumentParser) else parser
        docs = field_docs(self.cls)
        hints = typing.get_type_hints(self.cls)
        for f in self.fields():
            dest = self.dest(f.name)
            default = self.default(f)
            doc = docs.get(f.name, "").replace("%", "%%")  # argparse %-formats help: a literal "30%" broke --help
            kind, nargs, choices = _flag_type(self.cls, f.name, hints[f.name])
            choices = self.choices.get(f.name, choices)
            required = default is MISSING
            if kind is bool:
                group.add_argument(flag(dest), dest=dest, action=argparse.BooleanOptionalAction,
                                   default=None if required else default, required=required, help=doc)
                continue
            shown = "" if required else f" (default: {' '.join(map(str, default)) if nargs else default})"
            group.add_argument(flag(dest), dest=dest, type=kind, nargs=nargs, choices=choices,
                               default=None if required else default, required=required,
                               metavar=None if choices else dest.upper(), help=doc + shown)

    def build(self, args: argparse.Namespace, **values: Any) -> Any:
        """Return the config the parsed ``args`` describe; ``values`` give the fields without a flag."""
        for f in self.fields():
            if f.name not in values:
                value = getattr(args, self.dest(f.name))
                values[f.name] = tuple(value) if isinstance(value, list) else value
        return self.cls(**values)

    def argv(self, config: Any) -> list[str]:
        """The flags that rebuild ``config`` from the command's defaults (only where it leaves them)."""
        words: list[str] = []
        for f in self.fields():
            value = getattr(config, f.name)
            if value == self.default(f):
                continue
            option = flag(self.dest(f.name))
            if isinstance(value, bool):
                words.append(option if value else "--no-" + option[2:])
            elif isinstance(value, tuple):
                words += [option, *map(str, value)]
            else:
                words += [option, str(value)]
        return words


def _flag_type(cls: type, name: str, hint: Any) -> tuple[Callable[[str], Any], int | None, tuple | None]:
    """Return (argparse type, nargs, choices) for a field annotated ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args and len(args) == 2:  # X | None
        return _flag_type(cls, name, next(a for a in args if a is not type(None)))
    if origin is typing.Literal:
        return type(args[0]), None, args
    if origin is tuple and args and Ellipsis not in args and len(set(args)) == 1:
        return args[0], len(args), None
    if hint in (bool, int, float, str, Path):
        return hint, None, None
    raise TypeError(f"{cls.__name__}.{name}: no command-line flag for a field of type {hint}; "
                    "skip it or give it a flag by hand")
