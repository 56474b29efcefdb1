"""ModelBatch: train hundreds to thousands of independent PyTorch models at once."""

from modelbatch import (
    amp,
    batching,  # noqa: F401  (registers the recurrent vmap rules)
    callbacks,
    data,
    ops,  # noqa: F401  (loads _C and registers the kernels)
    optim,
)
from modelbatch._backend import backend_info, c_extension_loaded
from modelbatch.checkpoint import load_checkpoint, save_checkpoint
from modelbatch.clip import clip_grad_norm_
from modelbatch.core import ModelBatch, PerModelFallbackWarning, check_compatible
from modelbatch.data import (
    BootstrapRouter,
    DataRouter,
    KFoldRouter,
    RoutedBatch,
    StratifiedRouter,
    create_random_masks,
    masked_loss,
)
from modelbatch.optimizer import (
    OptimizerFactory,
    PerModelOptimizer,
    create_adam_configs,
    create_lr_sweep_configs,
    create_sgd_configs,
)
from modelbatch.population import copy_model_
from modelbatch.train import FitLoop, History, evaluate, fit
from modelbatch.train_step import TrainStep

__version__ = "0.1.0"
__all__ = [
    "BootstrapRouter",
    "DataRouter",
    "FitLoop",
    "History",
    "KFoldRouter",
    "ModelBatch",
    "OptimizerFactory",
    "PerModelFallbackWarning",
    "PerModelOptimizer",
    "RoutedBatch",
    "StratifiedRouter",
    "TrainStep",
    "amp",
    "backend_info",
    "c_extension_loaded",
    "callbacks",
    "check_compatible",
    "clip_grad_norm_",
    "copy_model_",
    "create_adam_configs",
    "create_lr_sweep_configs",
    "create_random_masks",
    "create_sgd_configs",
    "data",
    "evaluate",
    "fit",
    "load_checkpoint",
    "masked_loss",
    "optim",
    "save_checkpoint",
]
