"""modelbatch.integrations.wandb: a real W&B run in offline mode, read back from the
run directory (the ``.wandb`` transaction log and the table file), holds exactly
the per-model values of modelbatch.fit's History."""

import pytest

wandb = pytest.importorskip(
    "wandb", reason="needs the [wandb] extra: pip install 'modelbatch[wandb]'"
)

import glob  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import modelbatch as mb  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from modelbatch.integrations.wandb import WandbLogger  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402
from wandb.proto import wandb_internal_pb2  # noqa: E402

N = 4
LRS = [1e-3, 3e-3, 1e-2, 3e-2]
EPOCHS = 2


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONSOLE", "off")


def setup():
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)) for _ in range(N)]
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 3, generator=g)
    x, xv = torch.randn(64, 6, generator=g), torch.randn(32, 6, generator=g)
    batch = mb.ModelBatch(models, seeds=10)
    opt = mb.optim.AdamW(batch, lr=LRS, weight_decay=0.01)
    train = DataLoader(TensorDataset(x, (x @ w).argmax(1)), batch_size=16)
    val = DataLoader(TensorDataset(xv, (xv @ w).argmax(1)), batch_size=32)
    return batch, opt, train, val


def read_records(path):
    """The protobuf Records of a ``.wandb`` file: a 7-byte header (``:W&B``, magic
    0xBEE1, version 0), then LevelDB-log records in 32 KiB blocks, each with a
    7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    with open(path, "rb") as f:
        data = f.read()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0)
    block, pos, buf, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += left
            continue
        if pos + 7 + length > len(data):  # still being written
            break
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            records.append(record)
    return records


def _key(item):
    return "/".join(item.nested_key) if item.nested_key else item.key


def finished_records(run_dir, timeout=30.0):
    """The run's records once its ``exit`` record is on disk: ``run.finish()`` can
    return before the wandb-core service has flushed the log (seen in 0.31: a file
    of just the header, complete a fraction of a second later)."""
    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    deadline = time.monotonic() + timeout
    while True:
        records = read_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} has no exit record after {timeout} s")
        time.sleep(0.05)


def parse_run(run_dir):
    history, summary, config = [], {}, {}
    for r in finished_records(run_dir):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            history.append({_key(i): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            summary.update({_key(i): json.loads(i.value_json) for i in r.summary.update})
        elif kind == "run":
            config.update({_key(i): json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            config.update({_key(i): json.loads(i.value_json) for i in r.config.update})
    return history, summary, config


def same(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_offline_run_holds_the_per_model_history(tmp_path):
    batch, opt, train, val = setup()
    logger = WandbLogger(
        project="modelbatch-test",
        name="pop",
        config={"dataset": "toy"},
        log_every_n_steps=2,
        mode="offline",
        dir=str(tmp_path),
    )
    hist = mb.fit(
        batch, opt, train, F.cross_entropy, epochs=EPOCHS, val_loader=val, callbacks=[logger],
        progress=False,
    )  # fmt: skip

    run_dir = logger.run_dir
    assert os.path.isdir(run_dir) and os.path.basename(run_dir).startswith("offline-run-")
    assert os.path.dirname(run_dir) == str(tmp_path / "wandb")
    history, summary, config = parse_run(run_dir)

    # One row per epoch (the step rows of the same step merge into it) holding every
    # model's value of every column of the History, exactly (float64 through JSON).
    epochs = [row for row in history if "epoch" in row]
    assert [row["epoch"] for row in epochs] == list(range(EPOCHS))
    keys = ["train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "skipped_steps"]
    assert hist.keys == keys
    for e, row in enumerate(epochs):
        assert row["_step"] == (e + 1) * len(train)
        for key in hist.keys:
            for i in range(N):
                assert same(row[f"model_{i}/{key}"], hist.metric(key)[e, i].item()), (e, i, key)
        for key in ("train_loss", "val_loss", "val_accuracy"):
            v = hist.metric(key)[e]
            best, worst = (v.max(), v.min()) if "acc" in key else (v.min(), v.max())
            assert row[f"population/{key}/best"] == best.item()
            assert row[f"population/{key}/median"] == v.median().item()
            assert row[f"population/{key}/worst"] == worst.item()
    steps = [row["_step"] for row in history if "population/step_loss/best" in row]
    assert steps == list(range(2, EPOCHS * len(train) + 1, 2))

    # The hyper-parameters as config, per model.
    assert config["num_models"] == N
    assert config["optimizer"] == "AdamW"
    assert config["dataset"] == "toy"
    assert config["seeds"] == [10, 11, 12, 13]
    hp = config["model_hparams"]
    assert hp["lr"] == LRS
    assert hp["weight_decay"] == [0.01] * N
    assert hp["betas"] == [[0.9, 0.999]] * N

    # The summary table: one row per model, read from the run's media files.
    best = hist.best_model("val_loss")
    assert summary["best_model"] == best
    assert summary["best_val_loss"] == hist.last("val_loss")[best].item()
    assert summary["models/_type"] == "table-file"
    (table_file,) = glob.glob(os.path.join(run_dir, "files", "media", "table", "models_*.json"))
    with open(table_file) as f:
        table = json.load(f)
    cols = table["columns"]
    assert cols[:2] == ["model", "seed"]
    assert {"lr", "betas_0", "betas_1", "val_loss", "train_accuracy"} <= set(cols)
    assert len(table["data"]) == N
    for i, row in enumerate(table["data"]):
        rec = dict(zip(cols, row))
        assert rec["model"] == i and rec["seed"] == 10 + i
        assert rec["lr"] == LRS[i]
        assert rec["val_loss"] == hist.last("val_loss")[i].item()


def test_per_model_selection_and_bad_inputs(tmp_path):
    batch, opt, train, _ = setup()
    logger = WandbLogger(project="p", per_model=[1, 3], mode="offline", dir=str(tmp_path))
    hist = mb.fit(batch, opt, train, F.cross_entropy, epochs=1, callbacks=[logger], progress=False)
    history, _, _ = parse_run(logger.run_dir)
    (row,) = [r for r in history if "epoch" in r]
    assert {k.split("/")[0] for k in row if k.startswith("model_")} == {"model_1", "model_3"}
    assert row["model_3/train_loss"] == hist.last("train_loss")[3].item()
    assert row["population/train_loss/best"] == hist.last("train_loss").min().item()

    with pytest.raises(ValueError, match="project must be a string"):
        WandbLogger(project=3)
    with pytest.raises(ValueError, match="config must be a dict"):
        WandbLogger(config=[("lr", 1)])
    with pytest.raises(ValueError, match="log_every_n_steps must be an int >= 0"):
        WandbLogger(log_every_n_steps=-1)
    with pytest.raises(ValueError, match="per_model must be a bool or model indices"):
        WandbLogger(per_model="all")
    with pytest.raises(ValueError, match=r"per_model: indices \[4\] out of range for 4 models"):
        bad = WandbLogger(per_model=[0, 4], mode="offline", dir=str(tmp_path))
        mb.fit(batch, opt, train, F.cross_entropy, epochs=1, callbacks=[bad], progress=False)


def test_missing_wandb_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    with pytest.raises(ImportError, match=r"pip install 'modelbatch\[wandb\]'"):
        WandbLogger(project="p")


def test_example_runs(tmp_path, capsys):
    path = Path(__file__).resolve().parents[1] / "examples" / "wandb_offline.py"
    spec = importlib.util.spec_from_file_location("wandb_offline_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--epochs", "1", "--dir", str(tmp_path)])
    assert f"W&B offline run: {result['run_dir']}" in capsys.readouterr().out
    history, _, config = parse_run(result["run_dir"])
    (row,) = [r for r in history if "epoch" in r]
    assert row["model_7/val_loss"] == result["history"].last("val_loss")[7].item()
    assert config["num_models"] == 8
