"""The HuggingFace integration: HFModelBatch and ModelBatchTrainer with real transformers.

Tiny random-init BERT classifiers (nothing is downloaded). The contract checked: each
model of an HFModelBatch computes what it computes alone (outputs, losses, dropout),
and ModelBatchTrainer trains model i exactly as the plain ``transformers.Trainer``
trains it alone with learning rate i (and as a plain ModelBatch loop does).
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="needs the [hf] extra: pip install 'modelbatch[hf]'"
)

import modelbatch as mb  # noqa: E402
from modelbatch.integrations.huggingface import (  # noqa: E402
    BundledTrainer,
    HFModelBatch,
    HFTrainerMixin,
    ModelBatchTrainer,
    TrainerAdamW,
)
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    Trainer,
    TrainingArguments,
)

N, T, VOCAB, CLASSES = 4, 12, 100, 3
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hf_trainer.py"


@pytest.fixture(autouse=True)
def _quiet_transformers():
    # transformers' own progress bars and info logs, for readable failures only
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    yield
    transformers.utils.logging.enable_progress_bar()
    transformers.logging.set_verbosity(verbosity)


def _config(dropout: float = 0.1, **kwargs) -> BertConfig:
    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=CLASSES,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        **kwargs,
    )


def _models(n: int = N, cls=BertForSequenceClassification, **config) -> list:
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        out.append(cls(_config(**config)))
    return out


class _Tokens(torch.utils.data.Dataset):
    """Random sequences ``[T]``; the label is the bucket (0-2) of the first token."""

    def __init__(self, size: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (size, T), generator=g)
        self.labels = (self.ids[:, 0] * CLASSES) // VOCAB

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones(T, dtype=torch.long),
            "labels": self.labels[i],
        }


def _args(out, **kwargs) -> TrainingArguments:
    base = {
        "max_steps": 20,
        "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 32,
        "logging_steps": 5,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }
    return TrainingArguments(output_dir=str(out), **{**base, **kwargs})


def _batch_inputs(b: int = 5, seed: int = 0, per_model: bool = False):
    g = torch.Generator().manual_seed(seed)
    lead = (N, b) if per_model else (b,)
    ids = torch.randint(1, VOCAB, (*lead, T), generator=g)
    mask = torch.ones_like(ids)
    mask[..., 0, T - 4 :] = 0  # padding in one row of every model's batch
    labels = torch.randint(0, CLASSES, lead, generator=g)
    return ids, mask, labels


def _logged(trainer, key: str) -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h]


# ------------------------------------------------------------------ HFModelBatch
@pytest.mark.parametrize("per_model", [False, True], ids=["shared", "per_model"])
def test_outputs_equal_each_models_own_forward(per_model):
    models = _models()
    batch = HFModelBatch(copy.deepcopy(models)).eval()
    ids, mask, labels = _batch_inputs(per_model=per_model)
    out = batch(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)

    assert type(out) is transformers.modeling_outputs.SequenceClassifierOutput
    assert out.loss.shape == (N,) and out.logits.shape == (N, 5, CLASSES)
    assert out.hidden_states[-1].shape == (N, 5, T, 32)
    assert batch.forward_path == "vmap"
    for i, m in enumerate(models):
        pick = (lambda t: t[i]) if per_model else (lambda t: t)  # noqa: B023
        ref = m.eval()(input_ids=pick(ids), attention_mask=pick(mask), labels=pick(labels))
        torch.testing.assert_close(out.logits[i], ref.logits)
        torch.testing.assert_close(out.loss[i], ref.loss)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_dropout_is_each_models_own(attn):
    # rng="torch" replays model i alone after torch.manual_seed(seeds[i]): the same
    # hidden and attention dropout masks, through either attention implementation.
    models = _models()
    batch = HFModelBatch(copy.deepcopy(models), seeds=10, rng="torch", attn_implementation=attn)
    assert batch.config._attn_implementation == attn
    ids, mask, labels = _batch_inputs()
    out = batch.train()(input_ids=ids, attention_mask=mask, labels=labels)
    assert batch.forward_path == "vmap"
    for i, m in enumerate(models):
        m.set_attn_implementation(attn)
        torch.manual_seed(10 + i)
        ref = m.train()(input_ids=ids, attention_mask=mask, labels=labels)
        torch.testing.assert_close(out.logits[i], ref.logits)
    # ... and different models draw different masks
    assert not torch.allclose(out.logits[0], out.logits[1])


def test_causal_lm_with_per_model_padding_stays_vectorised():
    # A decoder: its default use_cache=True would return a cache object, and a
    # per-model padding mask makes transformers ask "any padding?" in Python; both
    # are handled inside the vectorised path (fallback=False would raise otherwise).
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(transformers.GPT2LMHeadModel(config))
    batch = HFModelBatch(copy.deepcopy(models), fallback=False).eval()
    ids = torch.randint(0, VOCAB, (3, 4, T))
    mask = torch.ones_like(ids)
    mask[1, 2, :5] = 0  # one model's batch is left-padded
    labels = torch.where(mask.bool(), ids, -100)
    out = batch(input_ids=ids, attention_mask=mask, labels=labels)
    assert batch.forward_path == "vmap" and out.loss.shape == (3,)
    for i, m in enumerate(models):
        m.set_attn_implementation("eager")
        ref = m.eval()(input_ids=ids[i], attention_mask=mask[i], labels=labels[i])
        torch.testing.assert_close(out.logits[i], ref.logits)
        torch.testing.assert_close(out.loss[i], ref.loss)
    with pytest.raises(ValueError, match="use_cache=True is not supported"):
        batch(input_ids=ids, use_cache=True)


def test_save_pretrained_round_trip(tmp_path):
    models = _models()
    batch = HFModelBatch(models, seeds=3)
    ids, mask, labels = _batch_inputs()
    batch.train()(input_ids=ids, attention_mask=mask, labels=labels)  # advance the streams
    folders = batch.save_pretrained(tmp_path)
    assert [Path(f).name for f in folders] == [f"model_{i}" for i in range(N)]

    for i, folder in enumerate(folders):
        assert (Path(folder) / "config.json").is_file()
        assert (Path(folder) / "model.safetensors").is_file()
        plain = AutoModelForSequenceClassification.from_pretrained(folder)
        assert type(plain) is BertForSequenceClassification
        state = plain.state_dict()
        assert state.keys() == models[i].state_dict().keys()
        for key, value in models[i].state_dict().items():
            assert torch.equal(state[key], value), (i, key)

    back = HFModelBatch.from_pretrained(tmp_path)
    assert back.num_models == N
    for (name, p), q in zip(batch.stacked_params().items(), back.stacked_params().values()):
        assert torch.equal(p, q), name
    assert torch.equal(back.seeds, batch.seeds)
    assert torch.equal(back.rng_offsets, batch.rng_offsets)

    # a plain list of HF folders, e.g. two of them in another order
    two = HFModelBatch.from_pretrained([folders[2], folders[0]])
    assert torch.equal(
        two.stacked_params()["classifier.weight"],
        batch.stacked_params()["classifier.weight"][[2, 0]],
    )


def test_bad_models_and_inputs():
    with pytest.raises(ValueError, match="at least one model"):
        HFModelBatch([])
    with pytest.raises(ValueError, match="PreTrainedModel instances; model 1 is a Linear"):
        HFModelBatch([_models(1)[0], torch.nn.Linear(2, 2)])
    mixed = [_models(1)[0], _models(1, cls=BertForTokenClassification)[0]]
    with pytest.raises(
        ValueError, match=r"model 1 is a BertForTokenClassification.*one architecture"
    ):
        HFModelBatch(mixed)
    with pytest.raises(ValueError, match=r"another config .*hidden_dropout_prob=0\.2 vs 0\.1"):
        HFModelBatch([_models(1)[0], _models(1, dropout=0.2)[0]])

    batch = HFModelBatch(_models())
    ids, mask, labels = _batch_inputs(per_model=True)
    with pytest.raises(ValueError, match=r"per-model inputs must be \[N=4, B, \.\.\.\]; input_ids"):
        batch(input_ids=ids[:3], attention_mask=mask[:3], labels=labels[:3])
    with pytest.raises(ValueError, match=r"per-model inputs must be .*attention_mask has shape"):
        batch(input_ids=ids, attention_mask=mask[:2], labels=labels)
    with pytest.raises(ValueError, match=r"input_ids must be shared \[B, \.\.\.\] \(2 dims"):
        batch(input_ids=ids[None])


# --------------------------------------------------------------------- Trainer
def test_trainer_trains_every_model(tmp_path):
    def accuracy(pred):
        return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    batch = HFModelBatch(_models(), seeds=0)
    trainer = ModelBatchTrainer(
        model=batch,
        args=_args(tmp_path, save_strategy="steps", save_steps=20, lr_scheduler_type="constant"),
        train_dataset=_Tokens(320, seed=0),
        eval_dataset=_Tokens(64, seed=1),
        compute_metrics=accuracy,
        learning_rates=[2e-3, 4e-3, 8e-3, 1.6e-2],
    )
    assert BundledTrainer is ModelBatchTrainer and isinstance(trainer, HFTrainerMixin)
    result = trainer.train()

    for i in range(N):
        losses = _logged(trainer, f"loss_model_{i}")
        assert len(losses) == 4
        assert losses[-1] < losses[0] - 0.02, (i, losses)
    first = next(h for h in trainer.state.log_history if "loss" in h)
    per = [first[f"loss_model_{i}"] for i in range(N)]
    assert first["loss"] == pytest.approx(sum(per) / N)
    assert first["loss_best"] == min(per)
    assert [first[f"learning_rate_model_{i}"] for i in range(N)] == [2e-3, 4e-3, 8e-3, 1.6e-2]
    assert all(first[f"grad_norm_model_{i}"] > 0 for i in range(N))
    assert result.training_loss == pytest.approx(
        sum(result.metrics[f"train_loss_model_{i}"] for i in range(N)) / N
    )

    metrics = trainer.evaluate()
    losses = [metrics[f"eval_loss_model_{i}"] for i in range(N)]
    assert metrics["eval_loss"] == pytest.approx(sum(losses) / N)
    assert metrics["eval_loss_best"] == min(losses)
    assert all(0 <= metrics[f"eval_accuracy_model_{i}"] <= 1 for i in range(N))
    pred = trainer.predict(_Tokens(8, seed=2))
    assert pred.predictions.shape == (N, 8, CLASSES)

    # every checkpoint holds one plain HF folder per model, the trained weights
    ckpt = tmp_path / "checkpoint-20"
    assert (ckpt / "optimizer.pt").is_file() and (ckpt / "trainer_state.json").is_file()
    plain = AutoModelForSequenceClassification.from_pretrained(ckpt / "model_3")
    assert torch.equal(plain.classifier.weight, batch.stacked_params()["classifier.weight"][3])


def test_trainer_equals_plain_modelbatch_loop(tmp_path):
    # The same models, seeds, batches (sequential order), per-model learning rates,
    # warm-up + linear schedule and per-model clipping in a hand-written loop. The
    # arithmetic is the same (one forward code, one fused AdamW kernel), so the
    # results agree to the last bit; dropout draws from the same Philox streams.
    models = _models()
    lrs = [3e-4, 1e-3, 3e-3, 1e-2]
    data = _Tokens(320, seed=0)
    batch = HFModelBatch(copy.deepcopy(models), seeds=0)
    trainer = ModelBatchTrainer(
        model=batch,
        args=_args(tmp_path, train_sampling_strategy="sequential", warmup_steps=3,
                   max_grad_norm=0.5, weight_decay=0.0),
        train_dataset=data,
        learning_rates=lrs,
    )  # fmt: skip
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, TrainerAdamW)

    ref = HFModelBatch(copy.deepcopy(models), seeds=0)
    opt = mb.optim.AdamW(ref, lr=lrs, weight_decay=0.0)
    sched = transformers.get_linear_schedule_with_warmup(opt, 3, 20)
    loader = torch.utils.data.DataLoader(
        data, batch_size=16, collate_fn=transformers.default_data_collator
    )
    ref.train()
    for _, inputs in zip(range(20), loader):
        opt.zero_grad()
        ref(**inputs).loss.sum().backward()
        mb.clip_grad_norm_(ref, 0.5)
        opt.step()
        sched.step()

    for name, p in batch.stacked_params().items():
        torch.testing.assert_close(p, ref.stacked_params()[name], rtol=0, atol=0, msg=name)
    torch.testing.assert_close(batch.rng_offsets, ref.rng_offsets)


def test_trainer_equals_plain_trainer_per_model(tmp_path):
    # Model i of a ModelBatchTrainer vs transformers.Trainer on model i alone with
    # learning rate i: the Trainer's data order, gradient accumulation, AdamW with
    # weight decay off for biases / LayerNorm, schedule, clipping, label smoothing,
    # logged and eval losses. Forward and
    # optimizer differ from torch's in float rounding only (batched GEMMs, the
    # fused kernel vs torch's fused AdamW), which 6 Adam steps amplify to ~1e-6
    # absolute at lr 1e-2: hence rtol 1e-4 / atol 1e-5 (float32 noise, far below
    # one step's update of lr * 1 = 1e-3 .. 1e-2). Dropout is off: the plain
    # Trainer draws it from torch's global generator, the batch from its streams.
    models = _models(2, dropout=0.0)
    lrs = [1e-3, 1e-2]
    train, val = _Tokens(224, seed=0), _Tokens(70, seed=1)  # (a short last eval batch)
    common = {
        "max_steps": 6,
        "gradient_accumulation_steps": 2,
        "logging_steps": 2,
        "warmup_steps": 2,
        "weight_decay": 0.05,
        "max_grad_norm": 0.5,
        "label_smoothing_factor": 0.1,  # the Trainer's own loss, applied per model
    }
    batch = HFModelBatch(copy.deepcopy(models), seeds=0)
    trainer = ModelBatchTrainer(
        model=batch,
        args=_args(tmp_path / "batch", **common),
        train_dataset=train,
        eval_dataset=val,
        learning_rates=lrs,
    )
    trainer.train()
    metrics = trainer.evaluate()

    for i, model in enumerate(models):
        plain = Trainer(
            model=model,
            args=_args(tmp_path / f"plain{i}", learning_rate=lrs[i], **common),
            train_dataset=train,
            eval_dataset=val,
        )
        plain.train()
        plain_eval = plain.evaluate()
        mine = batch.get_model_states()[i]
        for key, value in model.state_dict().items():
            torch.testing.assert_close(mine[key], value, rtol=1e-4, atol=1e-5, msg=key)
        plain_losses = _logged(plain, "loss")
        assert len(plain_losses) == 3
        assert _logged(trainer, f"loss_model_{i}") == pytest.approx(plain_losses)
        assert metrics[f"eval_loss_model_{i}"] == pytest.approx(plain_eval["eval_loss"], rel=1e-5)


def test_trainer_resumes_from_checkpoint(tmp_path):
    # 10 steps in one go == 5 steps, a checkpoint, and 5 more in a new trainer: the
    # per-model weights, optimizer state, schedule and random streams come back.
    def run(out, **kwargs):
        batch = HFModelBatch(_models(), seeds=0)
        trainer = ModelBatchTrainer(
            model=batch,
            args=_args(out, max_steps=10, save_strategy="steps", save_steps=5, warmup_steps=2),
            train_dataset=_Tokens(160, seed=0),
            learning_rates=[1e-3, 2e-3, 4e-3, 8e-3],
        )
        trainer.train(**kwargs)
        return batch

    whole = run(tmp_path)
    resumed = run(tmp_path / "again", resume_from_checkpoint=str(tmp_path / "checkpoint-5"))
    for name, p in whole.stacked_params().items():
        torch.testing.assert_close(resumed.stacked_params()[name], p, msg=name)
    assert torch.equal(resumed.rng_offsets, whole.rng_offsets)


def test_trainer_rejects_what_it_cannot_do(tmp_path):
    data = _Tokens(32, seed=0)
    with pytest.raises(
        ValueError, match=r"trains an HFModelBatch.*got a BertForSequenceClassification"
    ):
        ModelBatchTrainer(model=_models(1)[0], args=_args(tmp_path), train_dataset=data)
    batch = HFModelBatch(_models())
    with pytest.raises(ValueError, match=r"learning_rates: expected a scalar or 4 values.*got 3"):
        ModelBatchTrainer(model=batch, args=_args(tmp_path), learning_rates=[1e-3] * 3)
    trainer = ModelBatchTrainer(model=batch, args=_args(tmp_path, optim="adagrad"))
    with pytest.raises(ValueError, match=r"optim='adagrad'.*no fused per-model version"):
        trainer.create_optimizer()


def test_example_runs_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("hf_trainer_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    result = module.main(["--quick", "--out", str(tmp_path)])
    assert len(result["eval_loss"]) == 4 and 0 <= result["best"] < 4
    assert (tmp_path / f"model_{result['best']}" / "model.safetensors").is_file()
