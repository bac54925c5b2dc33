"""Sparse autoencoders: model (``model``), trainer (``train``), SAELens-layout files (``io``),
reconstruction metrics (``metrics``); spliced evaluation (``evaluate``) and feature statistics
(``features``).

    from workbench.sae import SAE, SAEConfig, SAETrainConfig, train_sae, save_sae, load_sae
"""

from __future__ import annotations

from workbench.sae.io import load_sae, save_sae
from workbench.sae.model import SAE, SAEConfig, SAEOutput
from workbench.sae.train import SAETrainConfig, TrainConfig, TrainResult, train_sae

__all__ = [
    "SAE", "SAEConfig", "SAEOutput", "SAETrainConfig", "TrainConfig", "TrainResult", "load_sae", "save_sae", "train_sae"
]
