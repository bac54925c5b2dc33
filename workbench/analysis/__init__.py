"""Analyses: induction and composition (induction.py), logit and tuned lens (logit_lens.py), direct logit
attribution (attribution.py), activation patching and ablation (patching.py), toy superposition
(superposition.py). Each returns tensors, dataclasses or DataFrames; figures live in ``workbench.plots``."""
