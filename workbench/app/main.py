"""The app: the page registry, navigation, and the shared sidebar.

``app.py`` calls :func:`main`. Tests render one page with :func:`render_page` (same sidebar, no
navigation), so each page can be checked on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module

import streamlit as st

from workbench.allocator import retain_freed_memory
from workbench.app import sidebar
from workbench.hooks import clear_run_hooks


@dataclass(frozen=True)
class PageSpec:
    """One page: its section in the navigation, title, URL path and the function that draws it."""

    section: str
    title: str
    url: str
    #: "module:function" under workbench.app, imported when the page is drawn
    target: str
    icon: str

    def function(self) -> Callable[[sidebar.Selection], None]:
        module, name = self.target.split(":")
        return getattr(import_module(f"workbench.app.{module}"), name)


PAGES: list[PageSpec] = [
    PageSpec("Foundations", "Tokenizer", "tokenizer", "foundations:tokenizer_page", ":material/text_fields:"),
    PageSpec("Foundations", "Embeddings", "embeddings", "foundations:embeddings_page", ":material/scatter_plot:"),
    PageSpec("Foundations", "Positional encodings", "positions", "foundations:positional_page", ":material/grid_on:"),
    PageSpec("Foundations", "Sampling", "sampling", "foundations:sampling_page", ":material/casino:"),
    PageSpec("Foundations", "Architecture", "architecture", "foundations:architecture_page", ":material/account_tree:"),
    PageSpec("Interpretability", "Attention", "attention", "attention:attention_page", ":material/visibility:"),
    PageSpec("Interpretability", "Induction heads", "induction", "induction:induction_page", ":material/repeat:"),
    PageSpec("Interpretability", "Logit lens", "logit-lens", "lens:lens_page", ":material/layers:"),
    PageSpec("Interpretability", "Attribution & patching", "attribution", "attribution:attribution_page",
             ":material/call_split:"),
    PageSpec("Interpretability", "SAE features", "sae", "sae:sae_page", ":material/hub:"),
    PageSpec("Interpretability", "Superposition", "superposition", "superposition:superposition_page",
             ":material/blur_on:"),
    PageSpec("Interpretability", "Probes & steering", "probes", "probes:probes_page", ":material/tune:"),
    PageSpec("Interpretability", "Circuit tracing", "circuits", "circuits:circuits_page", ":material/account_tree:"),
    PageSpec("Interpretability", "Training dynamics", "dynamics", "dynamics:dynamics_page", ":material/timeline:"),
    PageSpec("From scratch", "BPE step by step", "bpe", "teaching:bpe_page", ":material/merge:"),
    PageSpec("From scratch", "Attention from scratch", "attention-scratch", "teaching:attention_scratch_page",
             ":material/calculate:"),
    PageSpec("From scratch", "Nearly orthogonal directions", "orthogonal", "teaching:orthogonal_page",
             ":material/explore:"),
    PageSpec("From scratch", "KV cache", "kv-cache", "teaching:kv_cache_page", ":material/memory:"),
    PageSpec("From scratch", "Architecture, live", "architecture-live", "teaching:architecture_live_page",
             ":material/schema:"),
]

BY_URL = {p.url: p for p in PAGES}


def _draw(spec: PageSpec) -> None:
    selection = st.session_state.get("wb_selection")
    if selection is None:
        return
    _call(spec, selection)


def _call(spec: PageSpec, selection: sidebar.Selection) -> None:
    try:
        fn = spec.function()
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("workbench"):
            raise
        st.title(spec.title)
        st.info(f"This page needs `{exc.name}`, which has not landed in this checkout yet.")
        return
    fn(selection)


def _page(spec: PageSpec):
    def draw() -> None:
        _draw(spec)

    draw.__name__ = spec.url.replace("-", "_")
    return st.Page(draw, title=spec.title, url_path=spec.url, icon=spec.icon, default=spec is PAGES[0])


def main() -> None:
    """Run the whole app: navigation over every page, the sidebar above it."""
    # Streamlit runs a session's reruns on a reused thread: whatever a stopped run left in this thread's
    # run-local hooks (a generator abandoned mid-step, say) must not reach this run's forward passes
    clear_run_hooks()
    retain_freed_memory()  # every prompt caches all hooks: reuse that memory across reruns (see workbench.allocator)
    st.set_page_config(page_title="Interpretability workbench", page_icon=":material/biotech:", layout="wide")
    sections: dict[str, list] = {}
    for spec in PAGES:
        sections.setdefault(spec.section, []).append(_page(spec))
    nav = st.navigation(sections, expanded=True)  # every page listed: past 12 Streamlit would hide all but 10
    st.session_state["wb_selection"] = sidebar.render()
    nav.run()


def render_page(url: str) -> None:
    """Draw one page under the sidebar, without navigation (what the per-page tests run)."""
    clear_run_hooks()
    selection = sidebar.render()
    if selection is not None:
        _call(BY_URL[url], selection)
