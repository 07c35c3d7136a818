"""Training config: TOML + dotted overrides, field-naming errors, the resolved config's round trip."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch

from lmforge.config import PRESETS, ConfigError, MoEConfig, RopeScaling
from lmforge.train.config import (
    DataConfig,
    LoopConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    dumps,
    load_train_config,
    parse_value,
    save_resolved,
    to_dict,
)
from lmforge.train.optim import OPTIMIZERS, build_optimizer


def write(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error(path: Path | None, *overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_train_config(path, list(overrides))
    return str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# defaults, files and overrides


def test_defaults_are_a_valid_tiny_run(tmp_path):
    config = load_train_config(None, [])
    assert config == TrainConfig()
    assert load_train_config(write(tmp_path, ""), []) == config
    assert config.model == PRESETS["tiny"]
    assert config.data.seq_len <= config.model.max_seq_len
    assert config.lr_schedule().total_steps == config.train.max_steps  # schedule.total_steps none: max_steps


def test_file_then_overrides_in_order(tmp_path):
    path = write(
        tmp_path,
        '[optim]\nname = "lion"\nlr = 1e-3\n\n[train]\nmax_steps = 50\nout_dir = "runs/a"\n\n[data]\nbatch_size = 4\n',
    )
    config = load_train_config(path, ["optim.lr=3e-4", "train.max_steps=200", "train.max_steps=300"])
    assert config.optim.lr == 3e-4  # the override beats the file
    assert config.train.max_steps == 300  # the later override beats the earlier one
    assert config.optim.name == "lion" and config.train.out_dir == "runs/a" and config.data.batch_size == 4
    assert config.optim.betas == (0.9, 0.95) and config.data.grad_accum == 1  # untouched defaults


def test_override_values_are_toml_literals_or_bare_strings():
    config = load_train_config(
        None,
        [
            "optim.betas=[0.8, 0.99]",
            "train.compile=true",
            "train.out_dir=runs/x y",
            'data.shards="data/shards"',
            "train.time_budget_min=1",  # an int for a float field
            "train.max_steps=1e4",  # an integral float for an int field
            "optim.grad_clip=none",
        ],
    )
    assert config.optim.betas == (0.8, 0.99)
    assert config.train.compile is True
    assert config.train.out_dir == "runs/x y"
    assert config.data.shards == "data/shards"
    assert config.train.time_budget_min == 1.0 and isinstance(config.train.time_budget_min, float)
    assert config.train.max_steps == 10000 and isinstance(config.train.max_steps, int)
    assert config.optim.grad_clip is None


@pytest.mark.parametrize(
    ("text", "value"),
    [("3e-4", 3e-4), ("-2", -2), ("false", False), ("[1, 2]", [1, 2]), ('"a b"', "a b"), ("a b", "a b"),
     ("1\nx = 2", "1\nx = 2"), ("", "")],
)  # fmt: skip
def test_parse_value(text, value):
    assert parse_value(text) == value


# ---------------------------------------------------------------------------------------------------------------
# the model section


def test_preset_with_field_overrides(tmp_path):
    path = write(tmp_path, '[model]\npreset = "gpt2-124m"\nn_layers = 2\n')
    model = load_train_config(path, ["model.vocab_size=1000"]).model
    assert model == PRESETS["gpt2-124m"].replace(n_layers=2, vocab_size=1000)

    # a derived head_dim follows d_model / n_heads; an explicit one is kept
    assert load_train_config(None, ["model.d_model=256"]).model.head_dim == 64
    assert load_train_config(None, ["model.d_model=256", "model.head_dim=48"]).model.head_dim == 48
    # "none" sets a field that allows None: MHA instead of the preset's GQA
    assert load_train_config(None, ["model.n_kv_heads=none"]).model.kv_heads == 4
    assert load_train_config(None, ['model.preset="none"', "model.n_layers=2"]).model.d_model == 512


def test_nested_moe_and_rope_scaling(tmp_path):
    path = write(
        tmp_path,
        "[model.moe]\nn_experts = 4\ntop_k = 2\nd_expert = 64\nn_shared_experts = 1\n"
        '\n[model.rope_scaling]\nkind = "yarn"\nfactor = 4\noriginal_max_seq_len = 128\n',
    )
    model = load_train_config(path, ["model.moe.n_experts=8", "model.moe.dense_layers=[0]"]).model
    assert model.moe == MoEConfig(n_experts=8, top_k=2, d_expert=64, n_shared_experts=1, dense_layers=(0,))
    assert model.rope_scaling == RopeScaling("yarn", 4.0, 128)
    assert load_train_config(path, ["model.moe=none"]).model.moe is None

    # moe built from overrides alone, on a preset without one
    overrides = ["model.moe.n_experts=8", "model.moe.top_k=2", "model.moe.d_expert=32"]
    assert load_train_config(None, overrides).model.moe == MoEConfig(8, 2, 32)
    assert "model.moe.d_expert: required" in error(None, *overrides[:2])


# ---------------------------------------------------------------------------------------------------------------
# errors name the field


@pytest.mark.parametrize(
    ("override", "unknown", "hint"),
    [
        ("optim.lrr=1e-3", "optim.lrr", "did you mean 'lr'"),
        ("train.max_step=5", "train.max_step", "did you mean 'max_steps'"),
        ("model.moe.n_expert=8", "model.moe.n_expert", "did you mean 'n_experts'"),
        ("model.dmodel=64", "model.dmodel", "did you mean 'd_model'"),
        ("optimizer.lr=1e-3", "optimizer", "did you mean 'optim'"),
        ("model.preset=tinyy", "tinyy", "did you mean 'tiny'"),
        ("dist.zzz=1", "dist.zzz", "valid: backend, param_dtype, reduce_dtype, strategy"),
    ],
)
def test_unknown_names_get_a_suggestion(override, unknown, hint):
    msg = error(None, override)
    assert f"{unknown!r}" in msg and hint in msg


def test_unknown_section_in_a_file(tmp_path):
    msg = error(write(tmp_path, "[schedul]\nkind = 'wsd'\n"))
    assert "unknown section 'schedul'" in msg and "did you mean 'schedule'" in msg
    assert "optim: expected a table" in error(write(tmp_path, "optim = 3\n"))


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ('optim.lr="fast"', "optim.lr: expected float, got 'fast'"),
        ("train.compile=1", "train.compile: expected bool, got 1"),
        ("data.batch_size=2.5", "data.batch_size: expected int, got 2.5"),
        ("data.seq_len=true", "data.seq_len: expected int, got True"),
        ("optim.betas=[0.9]", "optim.betas: expected a list of 2 (float, float), got [0.9]"),
        ("optim.betas=[0.9, x]", "optim.betas: expected a list of 2"),  # not a TOML array: a bare string
        ('optim.betas=[0.9, "x"]', "optim.betas[1]: expected float, got 'x'"),
        ("optim.grad_clip=off", "optim.grad_clip: expected float or none, got 'off'"),
        ("model.d_model=big", "model.d_model: expected int, got 'big'"),
        ("model.moe=3", "model.moe: expected a table or none, got 3"),
        ("model.layer_types=full", "model.layer_types: expected a list of str or none, got 'full'"),
        ("model.moe.top_k=two", "model.moe.top_k: expected int, got 'two'"),
    ],
)
def test_wrong_type_names_field_type_and_value(override, expected):
    assert expected in error(None, override)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["optim.lr=0"], "optim.lr"),
        (["optim.lr=-1e-3"], "optim.lr"),
        (["optim.lr=nan"], "optim.lr"),
        (["optim.weight_decay=-0.1"], "optim.weight_decay"),
        (["optim.betas=[0.9, 1.0]"], "optim.betas[1]"),
        (["optim.name=adamw9"], "optim.name"),
        (["optim.grad_clip=0"], "optim.grad_clip"),
        (["data.batch_size=0"], "data.batch_size"),
        (["data.grad_accum=0"], "data.grad_accum"),
        (["data.val_fraction=1.0"], "data.val_fraction"),
        (["data.val_fraction=-0.1"], "data.val_fraction"),
        (["data.loader=shuffled"], "data.loader"),
        (["data.seq_len=1024"], "data.seq_len"),  # > model.max_seq_len = 512
        (["train.precision=fp8"], "train.precision"),
        (["train.max_steps=0"], "train.max_steps"),
        (["train.label_smoothing=1"], "train.label_smoothing"),
        (["train.device=tpu"], "train.device"),
        (["train.log_every=0"], "train.log_every"),
        (["train.keep_last=-1"], "train.keep_last"),
        (["schedule.kind=step"], "schedule.kind"),
        (["schedule.warmup_steps=1000"], "schedule.warmup_steps"),  # must be < total_steps = max_steps = 1000
        (["schedule.kind=wsd", "schedule.decay_shape=exp"], "schedule.decay_shape"),
        (["schedule.min_lr_ratio=2"], "schedule.min_lr_ratio"),
        (["dist.strategy=zero"], "dist.strategy"),
        (["dist.backend=nccl", "train.device=cpu"], "dist.backend"),
        (["model.n_kv_heads=3"], "model.n_kv_heads"),
        (["model.norm=batchnorm"], "model.norm"),
        (["model.moe.n_experts=2", "model.moe.top_k=4", "model.moe.d_expert=8"], "model.moe.top_k"),
        (["model.rope_scaling.kind=yarn"], "model.rope_scaling.original_max_seq_len"),
    ],
)
def test_out_of_range_names_the_field(overrides, field):
    assert f"invalid {field}=" in error(None, *overrides)


@pytest.mark.parametrize(
    ("override", "hint"),
    [("optim.lr", ""), ("lr=3e-4", "did you mean optim.lr?"), ("seed=1", "data.seed or train.seed"),
     ("=3", ""), ("optim..lr=1", ""), ("optim.=1", "")],
)  # fmt: skip
def test_bad_override_syntax(override, hint):
    msg = error(None, override)
    assert f"bad override {override!r}" in msg and "section.field=value" in msg and hint in msg


def test_toml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, '[optim]\nlr = 3e-4\nname = "adamw\n')
    msg = error(path)
    assert str(path) in msg and "line 3" in msg
    assert "config file not found" in error(tmp_path / "missing.toml")


def test_sections_validate_on_their_own():
    with pytest.raises(ConfigError, match=r"invalid optim\.lr="):
        OptimConfig(lr=0.0)
    with pytest.raises(ConfigError, match=r"invalid data\.grad_accum="):
        DataConfig(grad_accum=0)
    with pytest.raises(ConfigError, match=r"invalid schedule\.warmup_steps="):
        TrainConfig(train=LoopConfig(max_steps=10), schedule=ScheduleConfig(warmup_steps=10))


# ---------------------------------------------------------------------------------------------------------------
# the resolved config


def test_round_trip_through_save_resolved(tmp_path):
    overrides = [
        "model.moe.n_experts=4",
        "model.moe.top_k=2",
        "model.moe.d_expert=32",
        "model.moe.dense_layers=[0, 1]",
        "model.rope_scaling.kind=llama3",
        "model.rope_scaling.factor=8",
        "model.rope_scaling.original_max_seq_len=256",
        "model.sliding_window=64",
        'model.layer_types=["sliding", "full", "sliding", "full"]',
        "model.n_kv_heads=none",
        "optim.name=muon",
        "optim.momentum=0.95",
        "optim.eps=1e-10",
        "optim.grad_clip=none",
        "schedule.kind=wsd",
        "schedule.warmup_steps=10",
        "train.time_budget_min=2.5",
        'train.out_dir="runs/ü \\"quoted\\" back\\\\slash\ttab"',
        "data.shards=/data/shards",
    ]
    config = load_train_config(None, overrides)
    assert config.train.out_dir == 'runs/ü "quoted" back\\slash\ttab'
    path = save_resolved(config, tmp_path / "run")
    assert path == tmp_path / "run" / "config.toml"
    assert [p.name for p in path.parent.iterdir()] == ["config.toml"]  # no temporary file left behind
    assert load_train_config(path, []) == config
    assert tomllib.loads(path.read_text())["optim"]["grad_clip"] == "none"  # every field is written
    assert tomllib.loads(dumps(config)).keys() == to_dict(config).keys()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_round_trips(tmp_path, preset):
    config = load_train_config(None, [f"model.preset={preset}", "data.seq_len=128"])
    assert config.model == PRESETS[preset]
    assert load_train_config(save_resolved(config, tmp_path), []) == config


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_kwargs_build_every_optimizer(name):
    optim = load_train_config(None, [f"optim.name={name}", "optim.momentum=0.8", "optim.betas=[0.85, 0.9]"]).optim
    optimizer = build_optimizer(name, torch.nn.Linear(4, 4), optim.lr, optim.weight_decay, **optim.optimizer_kwargs())
    assert isinstance(optimizer, OPTIMIZERS[name])
    group = optimizer.param_groups[0]
    assert group["lr"] == optim.lr
    if name in ("adam", "adamw", "adamw8bit", "lion"):
        assert tuple(group["betas"]) == (0.85, 0.9)
    if name in ("sgd", "muon"):
        assert group["momentum"] == 0.8


def test_field_errors_name_the_toml_file_and_its_overrides(tmp_path):
    path = write(tmp_path, "[optim]\nlr = 1e30\n")
    assert error(path).startswith(f"{path}: invalid optim.lr=1e+30")
    assert error(write(tmp_path, "", "empty.toml"), "optim.lr=-1").startswith(
        f"{tmp_path / 'empty.toml'} (with --set optim.lr=-1): invalid optim.lr=-1"
    )
    assert error(None, "optim.lr=-1").startswith("invalid optim.lr=-1")
    (tmp_path / "latin1.toml").write_bytes(b"# caf\xe9\n")
    assert error(tmp_path / "latin1.toml") == f"{tmp_path / 'latin1.toml'}: not UTF-8 text (byte 5)"


def test_schedule_by_time_needs_a_budget_and_reaches_the_trainer(tmp_path):
    assert "a time-driven schedule needs train.time_budget_min" in error(None, "train.schedule_by=time")
    assert "train.schedule_by" in error(None, "train.schedule_by=clock")
    cfg = load_train_config(None, ["train.schedule_by=time", "train.time_budget_min=0.5"])
    assert (cfg.train.schedule_by, cfg.train.time_budget_min) == ("time", 0.5)
    assert load_train_config(write(tmp_path, dumps(cfg)), []) == cfg  # the resolved config.toml records it
