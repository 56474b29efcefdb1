"""Four tiny BERT classifiers, four learning rates, one ``transformers.Trainer`` run.

The task is synthetic, so nothing is downloaded: sequences of 16 random tokens
(vocabulary 100) into which one of three marker tokens is planted one to three
times; the label is which marker (0, 1 or 2). Every model is a
``BertForSequenceClassification`` of one tiny config with random weights (its own
seed); :class:`~modelbatch.integrations.huggingface.HFModelBatch` stacks them and
:class:`~modelbatch.integrations.huggingface.ModelBatchTrainer` trains them together,
each with its own learning rate under the Trainer's linear schedule, its own
gradient clipping, logs and evaluation.

Run ``python examples/hf_trainer.py`` (about 10 s on 2 CPU cores); ``--quick`` does
a few steps only. Prints each model's eval loss and accuracy and writes the final
checkpoint (``model_{i}/`` HF folders) under ``--out``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import transformers
from modelbatch.integrations.huggingface import HFModelBatch, ModelBatchTrainer
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

LEARNING_RATES = [3e-4, 1e-3, 3e-3, 1e-2]
SEQ_LEN = 16
VOCAB = 100
MARKERS = torch.tensor([3, 4, 5])  # the token ids planted; label = which one


class PlantedMarker(torch.utils.data.Dataset):
    """``{"input_ids": [T], "attention_mask": [T], "labels": []}`` items: random tokens
    (ids 6..99) with one to three copies of one marker at random places."""

    def __init__(self, size: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(6, VOCAB, (size, SEQ_LEN), generator=g)
        labels = torch.randint(0, len(MARKERS), (size,), generator=g)
        copies = torch.randint(1, 4, (size,), generator=g)
        for row in range(size):
            slots = torch.randperm(SEQ_LEN, generator=g)[: copies[row]]
            ids[row, slots] = MARKERS[labels[row]]
        self.ids = ids
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones(SEQ_LEN, dtype=torch.long),
            "labels": self.labels[i],
        }


class BestMedianPrinter(transformers.TrainerCallback):
    """Prints the best and median model's training loss at every logging step."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss_best" in logs:
            print(
                f"step {state.global_step:>4}  loss best {logs['loss_best']:.4f}  "
                f"median {logs['loss_median']:.4f}"
            )


def accuracy(pred: transformers.EvalPrediction) -> dict[str, float]:
    """One model's accuracy (the trainer calls it once per model)."""
    return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps")
    parser.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    parser.add_argument("--out", default=None, help="output directory (default: a temp dir)")
    opts = parser.parse_args(argv)
    steps = 5 if opts.quick else opts.steps
    out = opts.out or tempfile.mkdtemp(prefix="hf_trainer_")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=len(MARKERS),
    )
    models = []
    for seed in range(len(LEARNING_RATES)):
        torch.manual_seed(seed)
        models.append(BertForSequenceClassification(config))
    batch = HFModelBatch(models, seeds=0)

    args = TrainingArguments(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=128,
        warmup_steps=max(1, steps // 10),
        weight_decay=0.01,
        logging_steps=max(1, steps // 5),
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = ModelBatchTrainer(
        model=batch,
        args=args,
        train_dataset=PlantedMarker(4096, seed=0),
        eval_dataset=PlantedMarker(512, seed=1),
        compute_metrics=accuracy,
        learning_rates=LEARNING_RATES,
        callbacks=[BestMedianPrinter()],
    )
    # (instead of the Trainer's printer, which prints every per-model entry)
    trainer.remove_callback(transformers.PrinterCallback)
    start = time.time()
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(out)
    elapsed = time.time() - start

    n = batch.num_models
    eval_loss = [metrics[f"eval_loss_model_{i}"] for i in range(n)]
    eval_acc = [metrics[f"eval_accuracy_model_{i}"] for i in range(n)]
    print(f"{n} BERT classifiers, {steps} steps in {elapsed:.1f} s")
    print("model  lr       eval_loss  eval_accuracy")
    for i in range(n):
        print(f"{i:>5}  {LEARNING_RATES[i]:<7.0e}  {eval_loss[i]:>9.4f}  {eval_acc[i]:>13.3f}")
    best = int(np.argmin(eval_loss))
    print(f"best: model {best} (lr {LEARNING_RATES[best]:g}); its HF folder: {out}/model_{best}")
    return {
        "eval_loss": eval_loss,
        "eval_accuracy": eval_acc,
        "best": best,
        "out": out,
        "seconds": elapsed,
    }


if __name__ == "__main__":
    main()
