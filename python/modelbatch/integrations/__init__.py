"""Integrations with the tools people already run their sweeps through.

Each is an optional extra, imported only when its module is imported (importing
``modelbatch`` never imports any of these libraries):

* :mod:`modelbatch.integrations.huggingface` (``pip install modelbatch[hf]``):
  ``HFModelBatch``, ``ModelBatchTrainer`` / ``BundledTrainer``, ``HFTrainerMixin``;
* :mod:`modelbatch.integrations.lightning` (``[lightning]``): ``ModelBatchModule``;
* :mod:`modelbatch.integrations.optuna` (``[optuna]``): ``ModelBatchStudy``;
* :mod:`modelbatch.integrations.ray` (``[ray]``): ``tune_population``;
* :mod:`modelbatch.integrations.wandb` (``[wandb]``): ``WandbLogger``.

``pip install modelbatch[all]`` installs every one.
"""


def require(module: str, extra: str):
    """Import ``module`` or raise an ImportError naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"this integration needs {module!r}: pip install 'modelbatch[{extra}]'"
        ) from err
