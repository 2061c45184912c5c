"""Pipeline configs and plans: overrides are checked, keys change only where a setting reaches."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from pipelines.cli import main
from pipelines.config import PipelineError, load_pipeline, shipped_configs
from pipelines.plan import plan


def keys(cfg) -> dict[str, str]:
    return {s.name: s.key for s in plan(cfg)}


def test_every_shipped_config_loads_and_plans() -> None:
    assert {"synthetic_mini", "synthetic_ci", "st_resnet_table3"} <= set(shipped_configs())
    for name in shipped_configs():
        cfg = load_pipeline(name)
        data = {
            n: Path("/nonexistent") for n in cfg.datasets if cfg.datasets[n].kind != "synthetic"
        }
        if data:  # real datasets need roots; the plan checks them
            with pytest.raises(PipelineError, match="is not a .* dataset: no video folder"):
                plan(cfg, data)
        else:
            stages = plan(cfg)
            assert stages[-1].name == "table" and len({s.key for s in stages}) == len(stages)


def test_table3_stages_follow_the_papers_phases(tmp_path: Path) -> None:
    for ds, (videos, splits) in {
        "UCF101": ("UCF-101", "ucfTrainTestlist"),
        "HMDB51": ("hmdb51", "testTrainMulti_7030_splits"),
    }.items():
        (tmp_path / ds / videos).mkdir(parents=True)
        (tmp_path / ds / splits).mkdir()
        (tmp_path / ds / splits / "classInd.txt").write_text("1 A\n")
    cfg = load_pipeline("st_resnet_table3")
    stages = plan(cfg, {"UCF101": tmp_path / "UCF101", "HMDB51": tmp_path / "HMDB51"})
    names = [s.name for s in stages]
    # 2 datasets x 3 splits x (4 phases trained + 4 evaluated + 1 fused) + 4 prep each + table
    assert len(names) == 2 * 3 * 9 + 2 * 3 + 1
    star = next(s for s in stages if s.name == "train/HMDB51/split2/st-resnet-star")
    assert "train/HMDB51/split2/st-resnet" in star.deps
    assert 'model.init="train/HMDB51/split2/st-resnet/checkpoint.pt"' in star.command
    st = next(s for s in stages if s.name == "train/UCF101/split1/st-resnet")
    assert 'model.init_motion="train/UCF101/split1/motion/checkpoint.pt"' in st.command
    assert 'model.init=""' in st.command  # not the hand-run runs/... default


def test_a_changed_setting_rekeys_what_depends_on_it_and_nothing_else() -> None:
    base = keys(load_pipeline("synthetic_ci"))
    changed = keys(load_pipeline("synthetic_ci", ["phases.motion.optim.lrs=[0.02,0.001]"]))
    differ = {n for n in base if base[n] != changed[n]}
    assert differ == {
        "train/Synthetic/split1/motion",
        "eval/Synthetic/split1/motion",
        "eval/Synthetic/split1/two-stream",
        "train/Synthetic/split1/st-resnet",
        "eval/Synthetic/split1/st-resnet",
        "train/Synthetic/split1/st-resnet-star",
        "eval/Synthetic/split1/st-resnet-star",
        "table",
    }
    prep = keys(load_pipeline("synthetic_ci", ["prepare.short_side=32"]))
    assert prep["synth/Synthetic"] == base["synth/Synthetic"]
    assert prep["index/Synthetic"] == base["index/Synthetic"]
    assert all(prep[n] != base[n] for n in base if not n.startswith(("synth/", "index/")))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["no_such_table"], "Error: config 'no_such_table' not found (shipped: "),
        (["synthetic_ci", "--set", "prepare.shortside=3"], "Error: unknown config key "
         "'prepare.shortside'; known: flow_backend, flow_batch, flow_compile, jobs, "
         "shard_size, short_side"),
        (["synthetic_ci", "--set", "prepare.jobs=two"], "Error: prepare.jobs: expected int, "
         "got 'two'"),
        (["synthetic_ci", "--set", "train.model.widht=8"], "Error: phase appearance: unknown "
         "config key 'model.widht'; known: "),
        (["synthetic_ci", "--set", "phases.fast.optim.lrs=[1]"], "Error: override "
         "'phases.fast.optim.lrs=[1]': unknown phase 'fast'; known: appearance, motion, "),
    ],
)  # fmt: skip
def test_bad_config_or_override_is_one_line(args: list[str], message: str, tmp_path) -> None:
    result = CliRunner().invoke(main, ["run", *args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 1, result.output
    assert result.output.startswith(message) and result.output.count("\n") == 1
    assert not (tmp_path / "run").exists()  # nothing ran


def test_data_root_that_is_not_a_dataset_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "videos").mkdir()
    result = CliRunner().invoke(
        main, ["run", "synthetic_ci", "--data", str(tmp_path), "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 1
    assert result.output == (
        f"Error: data root {tmp_path} is not a synthetic dataset: no 'classInd.txt'\n"
    )


def test_phase_names_become_safe_path_components(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[datasets.S]\nkind = "synthetic"\n[phases."../../x"]\nconfig = "motion"\n'
        '[[columns]]\nkey = "m"\nname = "M"\nphases = ["../../x"]\n'
    )
    with pytest.raises(PipelineError, match=r"phases\.\.\./\.\./x: name '\.\./\.\./x' must be"):
        load_pipeline(bad)
