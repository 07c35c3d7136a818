"""Checkpoints from strangers: nothing is unpickled, and every payload field is checked before anything is restored.

Oracles: a planted file that does create its marker when unpickled the unsafe way (so the test proves refusal, not
a harmless file); torch's own `load_state_dict` for what a valid checkpoint restores; NumPy's and Python's random
streams for the restored RNG states.
"""

from __future__ import annotations

import math
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lmforge import ModelConfig, Transformer
from lmforge.train.checkpoint import LEGACY_FORMAT, CheckpointError, load_checkpoint, save_checkpoint
from lmforge.train.optim import OPTIMIZERS, build_optimizer
from lmforge.train.schedule import Schedule
from lmforge.train.trainer import Trainer
from malicious import Touch

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32)
SHAPES = {k: v.shape for k, v in Transformer(CFG).state_dict().items()}


class Batches:
    def batch(self, step: int) -> dict[str, torch.Tensor]:
        rows = torch.randint(0, CFG.vocab_size, (4, 17), generator=torch.Generator().manual_seed(step))
        return {"input_ids": rows[:, :-1], "targets": rows[:, 1:]}


def fresh(name: str = "adamw", seed: int = 0) -> tuple[Transformer, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Transformer(CFG)
    return model, build_optimizer(name, model, lr=1e-3, weight_decay=0.1)


def trained(name: str = "adamw") -> tuple[Transformer, torch.optim.Optimizer]:
    """A model and optimizer after one update (so the optimizer has per-parameter state)."""
    model, optimizer = fresh(name)
    Trainer(model, optimizer, Schedule("constant"), Batches(), max_steps=1, progress=False).train_step(0)
    return model, optimizer


@pytest.fixture(scope="module")
def payload(tmp_path_factory) -> dict[str, Any]:
    """A valid checkpoint payload (adamw, one step), as plain dicts to edit."""
    path = save_checkpoint(tmp_path_factory.mktemp("valid"), 1, *trained(), extra={"history": []})
    return torch.load(path, weights_only=True)


# ---------------------------------------------------------------------------------------------------------------
# nothing is unpickled


def plant(run_dir: Path, marker: Path, action: str, writer: str, payload: dict[str, Any]) -> Path:
    """A run directory's newest checkpoint: a valid-looking payload with a `Touch` in its extra."""
    path = run_dir / "checkpoints" / "step_00000005.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    evil = {**payload, "step": 5, "extra": {"history": [], "note": Touch(marker, action)}}
    if writer == "torch.save":
        torch.save(evil, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(evil, f)
    return path


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
@pytest.mark.parametrize("action", ["os.system", "pathlib.Path.touch"])
def test_a_malicious_checkpoint_is_refused_on_resume_and_runs_nothing(tmp_path, payload, action, writer):
    oracle = tmp_path / "oracle"
    planted = plant(oracle, oracle / "MARKER", action, writer, payload)
    if writer == "torch.save":
        torch.load(planted, weights_only=False)
    else:
        with open(planted, "rb") as f:
            pickle.load(f)
    assert (oracle / "MARKER").exists()  # the planted file does run code when unpickled the unsafe way

    run, marker = tmp_path / "run", tmp_path / "MARKER"
    plant(run, marker, action, writer, payload)
    model, optimizer = fresh()
    trainer = Trainer(model, optimizer, Schedule("constant"), Batches(), max_steps=8, run_dir=run, progress=False)
    with pytest.raises(CheckpointError, match=r"step_00000005\.pt: not a safe checkpoint, refusing to unpickle"):
        trainer.fit(resume=True)
    assert not marker.exists()
    assert trainer.step == 0 and not (run / "checkpoints" / "step_00000008.pt").exists()  # nothing trained


# ---------------------------------------------------------------------------------------------------------------
# valid checkpoints still load


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_state_passes_the_checks_and_restores_exactly(tmp_path, name):
    model, optimizer = trained(name)
    path = save_checkpoint(tmp_path, 1, model, optimizer)
    other_model, other_optimizer = fresh(name, seed=1)
    load_checkpoint(path, other_model, other_optimizer)
    for key, value in model.state_dict().items():
        assert torch.equal(other_model.state_dict()[key], value), key
    saved, restored = optimizer.state_dict(), other_optimizer.state_dict()
    assert saved["param_groups"] == restored["param_groups"]
    for i, state in saved["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(restored["state"][i][key]), torch.as_tensor(value)), (i, key)


@pytest.mark.parametrize("extra", [{"config": CFG}, {"path": Path("x")}, {"loss": np.float64(1.0)}, {"x": [object()]}])
def test_saving_refuses_what_loading_would_not_unpickle(tmp_path, extra):
    model, _ = fresh()
    with pytest.raises(ValueError, match="extra: must hold only tensors, str, int"):
        save_checkpoint(tmp_path, 1, model, extra=extra)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def draws() -> tuple[list[float], float, float]:
    return torch.rand(3).tolist(), random.random(), float(np.random.rand())


def test_random_streams_are_restored_from_plain_values(tmp_path):
    model, _ = fresh()
    path = save_checkpoint(tmp_path, 1, model)
    expected = draws()
    load_checkpoint(path, model)
    assert draws() == expected
    rng = torch.load(path, weights_only=True)["rng"]
    assert isinstance(rng["numpy"][1], torch.Tensor) and rng["numpy"][1].dtype == torch.int64  # no ndarray


def test_a_format_1_checkpoint_with_a_numpy_array_still_loads(tmp_path, payload):
    """Format 1 pickled NumPy's RNG keys as an ndarray: exactly NumPy's array types are allowed for it."""
    np.random.seed(1234)
    legacy = {**payload, "format": LEGACY_FORMAT, "rng": {**payload["rng"], "numpy": np.random.get_state()}}
    np.random.seed(1234)
    expected = float(np.random.rand())
    torch.save(legacy, tmp_path / "old.pt")
    model, optimizer = fresh(seed=3)
    assert load_checkpoint(tmp_path / "old.pt", model, optimizer)[0] == 1
    assert float(np.random.rand()) == expected


# ---------------------------------------------------------------------------------------------------------------
# every field is checked, naming the file and the field


def _set(d: dict, keys: tuple, value: Any) -> None:
    for key in keys[:-1]:
        d = d[key]
    if value is _DROP:
        del d[keys[-1]]
    else:
        d[keys[-1]] = value


_DROP = object()
W = "blocks.0.attn.q_proj.weight"
CASES = [
    (("format",), "lmforge-checkpoint/9", r"not an lmforge checkpoint"),
    (("rng",), _DROP, r"has no 'rng' entry"),
    (("step",), -1, r"step is -1, expected an integer in \[0, 2\*\*63\)"),
    (("step",), "5", r"step is '5', expected an integer"),
    (("step",), True, r"step is True, expected an integer"),
    (("model",), [], r"model is a list, expected a dict of tensors"),
    (("model", W), torch.zeros(3, 4), rf"model\['{W}'\] has shape \(3, 4\), the model needs \(32, 32\)"),
    (("model", W), torch.zeros(32, 32, dtype=torch.float16), rf"model\['{W}'\] has dtype torch.float16, the model"),
    (("model", W), 3, rf"model\['{W}'\] is 3, expected a tensor"),
    (("model", W), _DROP, rf"model has no '{W}'"),
    (("model", "blocks.9.x"), torch.zeros(1), r"model\['blocks.9.x'\] is not a tensor of the model"),
    (("optimizer",), [], r"optimizer is a list, expected None or an optimizer state_dict"),
    (("optimizer", "state"), _DROP, r"optimizer\['state'\] is missing"),
    (("optimizer", "param_groups", 0, "params"), [0], r"optimizer\['param_groups'\]\[0\]\['params'\] has 1 param"),
    (("optimizer", "param_groups", 0, "lr"), "fast", r"\['param_groups'\]\[0\]\['lr'\] is 'fast', expected a number"),
    (("optimizer", "param_groups", 0, "betas"), [0.9], r"\['betas'\] is a list, expected a list of \(a number, a"),
    (("optimizer", "param_groups", 0, "weight_decay"), _DROP, r"\[0\] has no 'weight_decay', which the optimizer"),
    (("optimizer", "state", 0, "exp_avg"), torch.zeros(3), r"\['state'\]\[0\]\['exp_avg'\] has shape \(3,\), param"),
    (("optimizer", "state", 0, "step"), "one", r"optimizer\['state'\]\[0\]\['step'\] is 'one', expected a tensor or"),
    (("optimizer", "state", 999), {"step": 1}, r"optimizer\['state'\]\[999\] belongs to no parameter"),
    (("optimizer", "param_groups", 0, "lr"), math.nan, r"\['param_groups'\]\[0\]\['lr'\] is nan, expected a number"),
    (("optimizer", "param_groups", 0, "eps"), -1.0, r"\[0\] has hyper-parameters AdamW refuses: invalid eps=-1.0"),
    (("optimizer", "param_groups", 0, "initial_lr"), "x", r"\[0\]\['initial_lr'\] is 'x', expected a number"),
    (("optimizer", "state", 0, "exp_avg_sq"), _DROP, r"\['state'\]\[0\] has keys \['exp_avg', 'step'\], the optimizer"),
    (("optimizer", "state", 0, "step"), -1, r"\['state'\]\[0\]\['step'\] is -1, expected a count"),
    (("optimizer", "state", 0, "step"), -1.0, r"\['state'\]\[0\]\['step'\] is -1.0, expected a count"),
    (("optimizer", "state", 0, "step"), 2.5, r"\['state'\]\[0\]\['step'\] is 2.5, expected a count"),
    (("sharded",), "no", r"sharded is 'no', expected True or False"),
    (("extra",), [], r"extra is a list, expected a dict"),
    (("rng", "torch"), torch.zeros(4, dtype=torch.uint8), r"rng\['torch'\] has shape \(4,\), expected \(5056,\)"),
    (("rng", "torch"), torch.zeros(5056, dtype=torch.uint8), r"rng\['torch'\] is not a valid generator state"),
    (("rng", "python"), (3, (1, 2), None), r"rng\['python'\]\[1\] has 2 entries, expected 625"),
    (("rng", "numpy"), ("PCG64", 1), r"rng\['numpy'\] is not a Mersenne Twister state"),
    (("rng", "numpy", 1), torch.full((624,), -1), r"rng\['numpy'\]\[1\] has keys outside \[0, 2\*\*32\)"),
]


@pytest.mark.parametrize(("keys", "value", "message"), CASES, ids=[f"{'.'.join(map(str, k))}" for k, _, _ in CASES])
def test_a_bad_field_is_named(tmp_path, payload, keys, value, message):
    edited = pickle.loads(pickle.dumps(payload))  # a deep copy, tensors included
    if keys[:2] == ("rng", "numpy") and len(keys) == 3:
        edited["rng"]["numpy"] = tuple(value if i == keys[2] else v for i, v in enumerate(edited["rng"]["numpy"]))
    else:
        _set(edited, keys, value)
    path = tmp_path / "step_00000001.pt"
    torch.save(edited, path)
    model, optimizer = fresh(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=rf"step_00000001\.pt: .*{message}"):
        load_checkpoint(path, model, optimizer)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # checked before restoring
    assert not optimizer.state


@pytest.mark.parametrize(
    ("name", "key", "value", "message"),
    [
        ("adafactor", "row_var", _DROP, r"has keys \['col_var', 'step'\], the optimizer keeps \['col_var', 'row_"),
        ("adafactor", "col_var", torch.zeros(2, 2), r"\['col_var'\] has shape \(2, 2\), parameter '.+' of shape"),
        ("adamw8bit", "exp_avg_codes", torch.zeros(3, dtype=torch.int8), r"\['exp_avg_codes'\] has shape \(3,\)"),
        ("adamw8bit", "exp_avg_sq_codes", "float", r"\['exp_avg_sq_codes'\] has dtype torch.float32, the optimizer"),
        ("muon", "exp_avg", torch.zeros(1), r"has keys \['exp_avg', 'momentum_buffer'\], the optimizer keeps \['mom"),
    ],
)
def test_the_state_each_optimizer_keeps_is_checked(tmp_path, name, key, value, message):
    """The expected state comes from the optimizer itself (its first update run on the meta device, or on a tiny
    stand-in where the update reads values): the keys, shapes and dtypes a step will use."""
    path = save_checkpoint(tmp_path, 1, *trained(name))
    payload = torch.load(path, weights_only=True)
    state = payload["optimizer"]["state"][0]
    if value is _DROP:
        del state[key]
    else:
        state[key] = state[key].float() if value == "float" else value
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=rf"step_00000001\.pt: optimizer\['state'\]\[0\].*{message}"):
        load_checkpoint(path, *fresh(name, seed=1))


def test_checkpoint_without_the_optimizer_state_for_a_resume(tmp_path):
    model, optimizer = fresh()
    path = save_checkpoint(tmp_path, 1, model)
    with pytest.raises(CheckpointError, match=r"step_00000001\.pt: has no optimizer state"):
        load_checkpoint(path, model, optimizer)


@pytest.mark.parametrize("cut", [0, 1, 100, 1000, 10_000, -100, -1])
def test_truncated_files_are_checkpoint_errors(tmp_path, payload, cut):
    path = tmp_path / "whole.pt"
    torch.save(payload, path)
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match=r"cut\.pt: not a (readable|safe) checkpoint"):
        load_checkpoint(tmp_path / "cut.pt", fresh()[0])


def test_flipped_bytes_load_or_are_checkpoint_errors(tmp_path, payload):
    """Random byte flips: either a CheckpointError, or a load whose model has the right shapes (data bytes)."""
    path = tmp_path / "whole.pt"
    torch.save(payload, path)
    data = bytearray(path.read_bytes())
    gen = random.Random(0)
    for i in range(30):
        flipped = bytearray(data)
        for _ in range(4):
            flipped[gen.randrange(len(flipped))] ^= 1 << gen.randrange(8)
        (tmp_path / f"f{i}.pt").write_bytes(bytes(flipped))
        model = fresh()[0]
        try:
            load_checkpoint(tmp_path / f"f{i}.pt", model, restore_rng=False)
        except CheckpointError as e:
            assert f"f{i}.pt" in str(e)
        assert all(v.shape == SHAPES[k] for k, v in model.state_dict().items())
