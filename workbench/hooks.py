"""Hook points: named identity modules through which activations can be read and replaced.

A :class:`HookPoint` returns its input unchanged unless a hook function is attached. Hook
functions take ``(activation, hook)`` and return ``None`` (observe) or a tensor of the same
shape (replace). :class:`HookedModule` gives a model name lookup, a context manager for
temporary hooks that always removes them, ``run_with_hooks`` and ``run_with_cache``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Union

import torch
from torch import Tensor, nn
from torch.nn.modules import module as module_hooks

from workbench.errors import HookError

HookFn = Callable[[Tensor, "HookPoint"], Union[Tensor, None]]
NameFilter = Union[None, str, Sequence[str], Callable[[str], bool]]
FwdHooks = Sequence[tuple[Union[str, Callable[[str], bool]], HookFn]]


class HookPoint(nn.Module):
    """An identity module that calls its hook functions on what passes through."""

    def __init__(self) -> None:
        super().__init__()
        self.name: str = ""
        self._fns: list[HookFn] = []

    def add(self, fn: HookFn) -> None:
        self._fns.append(fn)

    def clear(self) -> None:
        self._fns.clear()

    @property
    def active(self) -> bool:
        return bool(self._fns)

    @property
    def observe_only(self) -> bool:
        """Whether every attached hook only reads the activation (caching hooks are marked so)."""
        return all(getattr(fn, "observe_only", False) for fn in self._fns)

    def __call__(self, x: Tensor) -> Tensor:
        # The common case must cost nothing: with no hook attached (and no torch module hook registered
        # on this module or globally), skip nn.Module's call machinery, a few µs per call, ~600 calls per
        # SmolLM2 decode step.
        if not self._fns and not (self._forward_hooks or self._forward_pre_hooks or _global_module_hooks()):
            return x
        return super().__call__(x)

    def forward(self, x: Tensor) -> Tensor:
        if not self._fns:
            return x
        for fn in self._fns:
            out = fn(x, self)
            if out is None:
                continue
            if not isinstance(out, Tensor):
                raise HookError(
                    f"hook on {self.name!r} returned {type(out).__name__}; "
                    "a hook returns None (to observe) or a tensor of the same shape (to replace)"
                )
            if out.shape != x.shape:
                raise HookError(
                    f"hook on {self.name!r} returned shape {tuple(out.shape)}, "
                    f"expected {tuple(x.shape)} (the activation's shape)"
                )
            x = out
        return x

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


def _global_module_hooks() -> bool:
    """Whether torch-level forward hooks are registered for every module (``nn.modules.module``'s globals)."""
    return bool(module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks)


def name_matcher(names_filter: NameFilter) -> Callable[[str], bool]:
    """Return a predicate for a names filter: None (all), one name, a list of names, or a predicate."""
    if names_filter is None:
        return lambda name: True
    if isinstance(names_filter, str):
        return lambda name: name == names_filter
    if callable(names_filter):
        return names_filter
    wanted = set(names_filter)
    return lambda name: name in wanted


class HookedModule(nn.Module):
    """A module whose :class:`HookPoint` children are addressable by their dotted names.

    Subclasses call :meth:`setup_hooks` at the end of ``__init__``.
    """

    hook_dict: dict[str, HookPoint]

    def setup_hooks(self) -> None:
        self.hook_dict = {}
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                self.hook_dict[name] = module

    # -- lookup -----------------------------------------------------------------------------

    def hook_point(self, name: str) -> HookPoint:
        """Return the hook point called ``name``; an unknown name lists the nearest ones."""
        try:
            return self.hook_dict[name]
        except KeyError:
            close = difflib.get_close_matches(name, self.hook_dict, n=5, cutoff=0.5)
            hint = f"nearest: {', '.join(close)}" if close else "see model.hook_names() for the full list"
            raise HookError(f"no hook point named {name!r}; {hint}") from None

    def resolve(self, name_or_filter: str | Callable[[str], bool]) -> list[HookPoint]:
        """Return the hook points a name or a predicate selects (a name must exist)."""
        if isinstance(name_or_filter, str):
            return [self.hook_point(name_or_filter)]
        if callable(name_or_filter):
            return [hp for name, hp in self.hook_dict.items() if name_or_filter(name)]
        raise HookError(f"a hook target is a name or a predicate on names, got {type(name_or_filter).__name__}")

    # -- temporary hooks ---------------------------------------------------------------------

    @contextmanager
    def hooks(self, fwd_hooks: FwdHooks = ()) -> Iterator["HookedModule"]:
        """Attach ``(name_or_filter, fn)`` hooks for the duration of a ``with`` block.

        Exactly the hooks added here are removed on exit, also when the block raises; hooks
        attached by an enclosing ``with`` stay until that one exits.
        """
        added: list[tuple[HookPoint, HookFn]] = []
        try:
            for target, fn in fwd_hooks:
                for hp in self.resolve(target):
                    hp.add(fn)
                    added.append((hp, fn))
            yield self
        finally:
            for hp, fn in reversed(added):
                # remove by identity: the same function may be attached twice
                for i in range(len(hp._fns) - 1, -1, -1):
                    if hp._fns[i] is fn:
                        del hp._fns[i]
                        break

    def reset_hooks(self) -> None:
        """Remove every hook from every hook point."""
        for hp in self.hook_dict.values():
            hp.clear()

    def run_with_hooks(self, *args, fwd_hooks: FwdHooks = (), **kwargs):
        """Run ``forward`` with temporary hooks; they are removed afterwards, even on error."""
        with self.hooks(fwd_hooks):
            return self(*args, **kwargs)

    def caching_hooks(
        self,
        names_filter: NameFilter = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        incl_grad: bool = False,
    ) -> tuple[dict[str, Tensor], list[tuple[str, HookFn]]]:
        """Return an empty store and the hooks that fill it with the activations ``names_filter`` selects."""
        if isinstance(names_filter, str):
            self.hook_point(names_filter)
        elif isinstance(names_filter, Iterable) and not callable(names_filter):
            for name in names_filter:
                self.hook_point(name)  # unknown names are errors, not silently empty caches
        match = name_matcher(names_filter)
        store: dict[str, Tensor] = {}

        def save(x: Tensor, hook: HookPoint) -> None:
            y = x if incl_grad else x.detach()
            if device is not None or dtype is not None:
                y = y.to(device=device, dtype=dtype)
            store[hook.name] = y

        save.observe_only = True  # type: ignore[attr-defined]  # lets fused kernels run under caching
        return store, [(name, save) for name in self.hook_dict if match(name)]
