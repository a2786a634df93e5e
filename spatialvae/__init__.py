"""spatialvae: a spatial-latent VAE for chest X-rays (see README.md).

The names a user imports, e.g. ``from spatialvae import SpatialVAE, get_preset, build_trainer``.
They are loaded on first use (PEP 562), so ``import spatialvae`` and the CLI's ``--help`` do
not import torch; each name lives in the module listed below.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "config": ("Config", "DataConfig", "ModelConfig", "LossConfig", "PhaseConfig", "TrainConfig", "PriorConfig",
               "PRESETS", "get_preset"),
    "errors": ("SpatialVAEError", "ConfigError", "DatasetError", "WeightsError", "CheckpointError"),
    "model": ("SpatialVAE", "OriginalVAE", "build_model", "count_parameters"),
    "losses": ("VAELoss", "build_loss"),
    "data": ("ChestXRayDataset", "DataSplits", "make_datasets"),
    "runs": ("load_checkpoint", "load_model", "create_run_dir"),
    "training": ("Trainer", "build_trainer"),
    "sampling": ("GaussianSampler", "GMMSampler", "StandardNormalSampler", "PerClass", "fit_sampler", "encode_dataset",
                 "decode_latents", "generate", "interpolate"),
    "prior": ("LearnedPrior",),
    "prior_run": ("load_prior",),
    "lab.evaluate": ("evaluate_run",),
    "lab.report": ("metrics_table", "ablation_table"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = ["__version__", *_WHERE]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'spatialvae' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
