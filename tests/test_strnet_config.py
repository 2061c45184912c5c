"""strnet.config: shipped Table 2 phases, typed overrides, one-line errors."""

from __future__ import annotations

import pytest

from strnet.config import (
    ConfigError,
    TrainConfig,
    config_from_dict,
    is_set,
    load_config,
    parse_override,
    to_dict,
)

# Table 2: SGD batch, BN batch, (lr, iterations), chunks, tau range
TABLE_2 = {
    "motion": (256, 86, [1e-2, 1e-3], [30000, 10000], 1, (1, 1)),
    "appearance": (256, 8, [1e-2, 1e-3], [10000, 10000], 1, (1, 1)),
    "st-resnet": (128, 4, [1e-3, 1e-4, 1e-5], [30000, 30000, 20000], 5, (5, 15)),
    "st-resnet-star": (128, 4, [1e-4, 1e-5], [2000, 2000], 11, (1, 15)),
}


@pytest.mark.parametrize("phase", sorted(TABLE_2))
def test_shipped_phases_match_table_2(phase):
    cfg = load_config(phase)
    batch, bn, lrs, its, chunks, tau = TABLE_2[phase]
    assert cfg.optim.batch_size == batch and cfg.model.bn_sub_batch == bn
    assert cfg.optim.lrs == lrs and cfg.optim.iterations == its
    assert cfg.data.num_chunks == chunks and (cfg.data.tau_min, cfg.data.tau_max) == tau
    assert cfg.optim.momentum == 0.9 and cfg.data.flow_stack == 10
    assert cfg.optim.batch_size % cfg.optim.micro_batch == 0  # gradient accumulation divides


def test_phase_specific_inputs_and_init():
    assert load_config("motion").data.crop == "motion"
    assert not load_config("motion").data.use_rgb and not load_config("appearance").data.use_flow
    st = load_config("st-resnet")
    assert st.model.init_motion.endswith("motion/checkpoint.pt")
    assert st.model.init_appearance.endswith("appearance/checkpoint.pt")
    assert load_config("st-resnet-star").model.init.endswith("st-resnet/checkpoint.pt")
    assert load_config("st-resnet-star").model.name == "st_resnet50_star"


def test_overrides_are_typed():
    cfg = load_config(
        "st-resnet",
        ["optim.lrs=[1, 0.5, 0.25]", "run.seed=3", "data.root=/data/ucf 101", "data.use_rgb=false",
         "optim.momentum=0", 'run.out="a=b"'],
    )  # fmt: skip
    assert cfg.optim.lrs == [1.0, 0.5, 0.25] and isinstance(cfg.optim.lrs[0], float)
    assert cfg.run.seed == 3 and cfg.data.root == "/data/ucf 101"
    assert cfg.data.use_rgb is False and cfg.optim.momentum == 0.0 and cfg.run.out == "a=b"
    assert parse_override("a.b.c=[1,2]") == {"a": {"b": {"c": [1, 2]}}}


@pytest.mark.parametrize(
    "override,message",
    [
        ("run.seed=1.5", "run.seed: expected int, got 1.5"),
        ("run.seed=true", "run.seed: expected int, got True"),
        ("data.use_rgb=1", "data.use_rgb: expected bool, got 1"),
        ("optim.lrs=0.1", "optim.lrs: expected a list, got 0.1"),
        ("optim.iterations=[1, 2.5]", "optim.iterations[1]: expected int, got 2.5"),
        ("data=3", "data: expected a table of settings, got 3"),
        ("seed", "override 'seed' is not key=value"),
        ("optim.momentum=1.5", "optim.momentum must be in [0, 1)"),
        ("optim.micro_batch=48", "optim.batch_size must be a multiple of micro_batch"),
        ("optim.lrs=[0.1]", "optim.lrs and optim.iterations need equal length"),
        ("data.crop=random", "bad data.crop 'random'"),
        ("model.num_classes=-1", "model.num_classes must be >= 0 (0 = from the data), got -1"),
        ("model.width=-8", "model.width must be >= 0 (0 = from init or 64), got -8"),
        ("run.val_every=-1", "run.val_every must be >= 0 (0 = off), got -1"),
        # zero or negative counts and periods a loop divides by or steps by (issue 13)
        ("run.log_every=0", "run.log_every must be >= 1, got 0"),
        ("run.ckpt_every=-5", "run.ckpt_every must be >= 1, got -5"),
        ("optim.micro_batch=0", "optim.micro_batch must be >= 1, got 0"),
        ("optim.batch_size=0", "optim.batch_size must be >= 1, got 0"),
        ("optim.iterations=[0, 5]", "optim.iterations[0] must be >= 1, got 0"),
        ("optim.lrs=[0.1, -1]", "optim.lrs[1] must be a finite number > 0, got -1.0"),
        ("optim.lrs=[nan, 0.1]", "optim.lrs[0] must be a finite number > 0, got nan"),
        ("optim.weight_decay=-1", "optim.weight_decay must be a finite number >= 0, got -1.0"),
        ("data.num_workers=-1", "data.num_workers must be >= 0, got -1"),
        ("data.split=0", "data.split must be >= 1, got 0"),
        ("data.crop_size=0", "data.crop_size must be >= 1, got 0"),
        ("data.test_chunks=0", "data.test_chunks must be >= 1, got 0"),
        ("data.num_chunks=0", "data.num_chunks must be >= 1, got 0"),
        ("model.in_channels=-3", "model.in_channels must be >= 0 (0 = from the data), got -3"),
        ("run.seed=-1", "run.seed must be >= 0, got -1"),
        ("run.max_steps=-1", "run.max_steps must be >= 0 (0 = full schedule), got -1"),
        ("run.precise_bn=-2", "run.precise_bn must be >= 0 (0 = off), got -2"),
        ("model.head_dropout=1.0", "model.head_dropout must be in [0, 1), got 1.0"),
        ("optim.loss='svm'", "optim.loss must be one of softmax, hinge, got 'svm'"),
    ],
)
def test_bad_values_fail_with_one_line(override, message):
    with pytest.raises(ConfigError) as exc:
        load_config("motion", [override])
    assert str(exc.value) == message


def test_unknown_keys_and_files_fail(tmp_path):
    with pytest.raises(ConfigError, match=r"^unknown config key 'optim.lr'; known: batch_size"):
        load_config("motion", ["optim.lr=0.1"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nname = 'resnet50'\ndepht = 50\n")
    with pytest.raises(ConfigError, match=r"^unknown config key 'model.depht'"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"^config 'nope' not found \(shipped: motion, "):
        load_config("nope")
    broken = tmp_path / "broken.toml"
    broken.write_text("[model\n")
    with pytest.raises(ConfigError) as exc:
        load_config(broken)
    assert "\n" not in str(exc.value)


def test_resolved_config_round_trips():
    cfg = load_config("st-resnet-star", ["run.seed=5"])
    assert config_from_dict(to_dict(cfg)) == cfg


def test_unset_fields_are_left_to_the_data_and_init_checkpoints():
    cfg = load_config("st-resnet", ["data.flow_stack=10"])
    assert cfg.model.num_classes == 0 and cfg.model.width == 0 and cfg.run.val_every == 0
    assert is_set(cfg, "data.flow_stack")
    assert not is_set(load_config("st-resnet"), "data.flow_stack")
    built = TrainConfig()  # built in Python: set means "not the default"
    assert not is_set(built, "data.flow_stack")
    built.data.flow_stack = 3
    assert is_set(built, "data.flow_stack")
    # a run's config.json holds the class names beside the settings
    assert config_from_dict({**to_dict(cfg), "classes": ["a", "b"]}) == cfg


def test_zero_periods_fail_where_the_config_is_read(tmp_path):
    """A TOML file and a stored config (a checkpoint's) are checked like overrides."""
    toml = tmp_path / "zero.toml"
    toml.write_text("[run]\nlog_every = 0\n")
    with pytest.raises(ConfigError) as exc:
        load_config(toml)
    assert str(exc.value) == "run.log_every must be >= 1, got 0"
    values = to_dict(load_config("motion"))
    values["run"]["ckpt_every"] = 0
    with pytest.raises(ConfigError) as exc:
        config_from_dict(values)
    assert str(exc.value) == "run.ckpt_every must be >= 1, got 0"


def test_head_dropout_is_refused_for_networks_without_a_resnet_head():
    from strnet.runtime import build_model

    cfg = load_config("resnet3d18-kinetics", ["model.head_dropout=0.5", "model.num_classes=4"])
    with pytest.raises(ConfigError, match="^model.head_dropout is a setting of the ResNet streams"):
        build_model(cfg)
    cfg = load_config("motion", ["model.head_dropout=0.8", "model.num_classes=4", "model.width=8"])
    assert build_model(cfg).drop.p == 0.8
