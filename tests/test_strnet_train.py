"""strnet.train: overfitting through the real reader, exact resume, torchrun on CPU, errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from flowprep.shards import pack, read_index
from strnet.checkpoint import load_checkpoint
from strnet.config import ConfigError, load_config, to_dict
from strnet.resolve import resolve_run
from strnet.runtime import open_data
from strnet.train import (
    build_model,
    initialise,
    lr_at,
    train,
    train_command,
    truncate_metrics,
)

REPO = Path(__file__).resolve().parents[1]


def write_clip_folder(
    root: Path, per_class: int = 3, num_frames: int = 10, size: tuple[int, int] = (32, 40)
) -> Path:
    """Frame folders in flowprep's layout for 2 classes told apart by colour and vertical flow.

    Both cues survive horizontal flips, so a model can fit every training clip. Video ids are
    nested (`class/v_...`) like mmaction2 rawframes.
    """
    rng = np.random.default_rng(0)
    h, w = size
    lines = []
    for label, (colour, fy) in enumerate([((200, 40, 40), 170), ((40, 40, 200), 86)]):
        for g in range(per_class):
            vid = f"c{label}/v_c{label}_g{g:02d}"
            d = root / vid
            d.mkdir(parents=True)
            for k in range(num_frames):
                img = rng.integers(0, 60, size=(h, w, 3)).astype(np.uint8)
                y, x = rng.integers(0, h - 12), rng.integers(0, w - 12)
                img[y : y + 12, x : x + 12] = colour
                cv2.imwrite(str(d / f"img_{k + 1:05d}.jpg"), img[..., ::-1])
            for k in range(num_frames - 1):
                fx = rng.integers(100, 156, size=(h, w)).astype(np.uint8)
                fyk = np.clip(fy + rng.integers(-20, 20, size=(h, w)), 0, 255).astype(np.uint8)
                cv2.imwrite(str(d / f"flow_x_{k + 1:05d}.jpg"), fx)
                cv2.imwrite(str(d / f"flow_y_{k + 1:05d}.jpg"), fyk)
            meta = {
                "video_id": vid, "source": f"{vid}.avi", "label": f"c{label}",
                "label_index": label, "source_width": w, "source_height": h, "source_fps": 25.0,
                "source_frames": num_frames, "width": w, "height": h, "num_frames": num_frames,
                "num_flows": num_frames - 1, "index_base": 1, "flow_bound": 20.0,
                "flow_format": "jpeg", "settings": {}, "settings_hash": "test",
            }  # fmt: skip
            (d / "meta.json").write_text(json.dumps(meta))
            (d / ".done").write_text(json.dumps({"settings_hash": "test"}))
            lines.append(f"{vid} {num_frames} {label}")
    (root / "train_split1.txt").write_text("\n".join(lines) + "\n")
    (root / "test_split1.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    return write_clip_folder(tmp_path_factory.mktemp("clips"))


def tiny(clips: Path, out: Path, *extra: str, config: str = "st-resnet"):
    """A phase config shrunk to run in seconds on CPU (width 8, 32 px crops, 2 classes)."""
    sets = [
        f"data.root={json.dumps(str(clips))}", f"run.out={json.dumps(str(out))}",
        "data.num_workers=0", "data.crop_size=32", "data.flow_stack=3", "model.num_classes=2",
        "model.width=8", "model.bn_sub_batch=0", "model.init=''",
        "model.init_appearance=''", "model.init_motion=''", "run.progress=false",
        "run.log_every=1", "optim.weight_decay=0.0",
    ]  # fmt: skip
    return load_config(config, sets + list(extra))


def test_tiny_st_resnet_overfits_through_the_reader(clips, tmp_path):
    """Packed into HDF5 shards, read back by flowprep's reader in the training loop."""
    shards = tmp_path / "shards"
    pack(clips, shards, shard_size=20_000)
    assert len(set(read_index(shards)["videos"].values())) > 1  # several shard files
    torch.manual_seed(0)
    cfg = tiny(
        shards, tmp_path / "run", "data.num_chunks=2", "data.tau_min=1", "data.tau_max=3",
        "optim.batch_size=6", "optim.micro_batch=6", "optim.lrs=[0.05]", "optim.iterations=[25]",
    )  # fmt: skip
    summary = train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["step"] == 25 and len(rows) == 25
    assert np.mean([r["loss"] for r in rows[-3:]]) < 0.5 * np.mean([r["loss"] for r in rows[:3]])
    assert [r["acc"] for r in rows[-3:]] == [1.0, 1.0, 1.0]
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["step"] == 25 and ckpt["config"]["data"]["num_chunks"] == 2
    assert set(ckpt) >= {"model", "optimizer", "rng", "sampler", "schedule", "config"}
    assert ckpt["classes"] == summary["classes"] == ["c0", "c1"]  # from the shards' metadata
    assert json.loads((tmp_path / "run" / "config.json").read_text())["classes"] == ["c0", "c1"]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact(clips, tmp_path, workers):
    """Also with persistent DataLoader workers: the epoch reaches them with every index."""
    base = [
        "optim.batch_size=4", "optim.micro_batch=2", "optim.lrs=[0.05,0.01]",
        "optim.iterations=[3,10]", "run.ckpt_every=100", f"data.num_workers={workers}",
    ]  # fmt: skip
    full = train(tiny(clips, tmp_path / "full", *base, "run.max_steps=5", config="motion"))
    part = train(tiny(clips, tmp_path / "part", *base, "run.max_steps=2", config="motion"))
    assert part["step"] == 2 and part["weights_digest"] != full["weights_digest"]
    resumed = train(
        tiny(clips, tmp_path / "part", *base, "run.max_steps=5", config="motion"), resume=True
    )
    assert resumed["step"] == 5
    assert resumed["weights_digest"] == full["weights_digest"]
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["sampler"] == b["sampler"] and a["sampler"]["epoch"] == 3  # 6 clips, 2 per step


def test_torchrun_two_ranks_on_cpu_hold_identical_weights(clips, tmp_path):
    script = tmp_path / "run_rank.py"
    script.write_text(
        "import json, os, sys\n"
        "from strnet.config import load_config\n"
        "from strnet.train import train\n"
        "cfg = load_config('appearance', json.loads(sys.argv[1]))\n"
        "s = train(cfg)\n"
        "out = os.path.join(sys.argv[2], 'rank%s.json' % os.environ['RANK'])\n"
        "open(out, 'w').write(json.dumps(s))\n"
    )
    cfg = tiny(clips, tmp_path / "ddp", config="appearance")  # validates the overrides
    sets = [
        f"data.root={json.dumps(str(clips))}", f"run.out={json.dumps(str(tmp_path / 'ddp'))}",
        "data.num_workers=0", "data.crop_size=32", "model.num_classes=2", "model.width=8",
        "model.bn_sub_batch=0", "model.init=''", "run.progress=false",
        "optim.batch_size=4", "optim.micro_batch=2", "optim.lrs=[0.05]", "optim.iterations=[2]",
    ]  # fmt: skip
    assert cfg.model.name == "resnet50"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", str(script), json.dumps(sets), str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["step"] == r1["step"] == 2
    assert r0["weights_digest"] == r1["weights_digest"]
    # both ranks saw the whole SGD batch of 4: 2 micro-batches of 2, one per rank
    assert r0["acc"] == r1["acc"]


def test_lr_schedule_follows_table_2_steps():
    cfg = load_config("st-resnet")
    lrs, its = cfg.optim.lrs, cfg.optim.iterations
    assert [lr_at(s, lrs, its) for s in (0, 29999, 30000, 59999, 60000, 79999)] == [
        1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5]  # fmt: skip


def test_errors_are_one_line(clips, tmp_path):
    runner = CliRunner()
    root = json.dumps(str(clips))
    r = runner.invoke(train_command, ["motion", "--set", "optim.momentum=fast"])
    assert r.exit_code == 1
    assert r.output.strip() == "Error: optim.momentum: expected float, got 'fast'"
    r = runner.invoke(train_command, ["motion", "--set", "optim.nesterov=true"])
    assert r.output.strip().startswith("Error: unknown config key 'optim.nesterov'")
    assert len(r.output.strip().splitlines()) == 1
    r = runner.invoke(
        train_command,
        [
            "motion",
            "--out",
            str(tmp_path / "none"),
            "--resume",
            "--set",
            f"data.root={root}",
            "--set",
            "data.num_workers=0",
        ],
    )
    assert r.exit_code == 1
    assert r.output.strip() == (
        f"Error: nothing to resume: '{tmp_path / 'none' / 'checkpoint.pt'}' not found"
    )
    r = runner.invoke(
        train_command,
        [
            "st-resnet",
            "--out",
            str(tmp_path / "x"),
            "--set",
            f"data.root={root}",
            "--set",
            "model.width=8",
            "--set",
            "model.init_appearance='/no/such/rgb.pt'",
        ],
    )
    assert r.exit_code == 1
    assert r.output.strip() == "Error: checkpoint '/no/such/rgb.pt' not found"
    bad_list = tmp_path / "list.txt"
    bad_list.write_text("c0/v_c0_g00 10 0\nc9/v_missing 10 1\n")
    r = runner.invoke(
        train_command,
        [
            "motion",
            "--set",
            f"data.root={root}",
            "--set",
            f"data.train_list={json.dumps(str(bad_list))}",
        ],
    )
    assert r.exit_code == 1
    assert r.output.strip() == "Error: video 'c9/v_missing' of the list is not in the data"
    with pytest.raises(ConfigError, match="tau_min/tau_max"):
        load_config("st-resnet", ["data.tau_min=9", "data.tau_max=3"])


def test_phases_initialise_from_previous_checkpoints(clips, tmp_path):
    torch.manual_seed(0)
    rgb_cfg = tiny(clips, tmp_path / "a", config="appearance")
    rgb_net = build_model(rgb_cfg)
    torch.save(rgb_net.state_dict(), tmp_path / "imagenet.pt")  # a bare torchvision-style file
    init = f"model.init={json.dumps(str(tmp_path / 'imagenet.pt'))}"
    flow_cfg = tiny(clips, tmp_path / "m", init, config="motion")
    flow_net = build_model(flow_cfg)
    initialise(flow_net, flow_cfg)
    src, dst = rgb_net.state_dict(), flow_net.state_dict()
    adapted = [k for k in src if src[k].ndim == 4 and src[k].shape[1] == 3]
    assert adapted and all(dst[k].shape[1] == 6 for k in adapted)
    for k in adapted:  # authors' rule: mean of the RGB filters, replicated over the stack
        torch.testing.assert_close(dst[k], src[k].mean(1, keepdim=True).expand_as(dst[k]))
    same = [k for k in src if k not in adapted and src[k].shape == dst[k].shape]
    assert all(torch.equal(src[k], dst[k]) for k in same) and len(same) + len(adapted) == len(src)

    # ST-ResNet starts from the two stream phases
    torch.save({"model": rgb_net.state_dict()}, tmp_path / "rgb.pt")
    torch.save({"model": flow_net.state_dict()}, tmp_path / "flow.pt")
    rgb_init = f"model.init_appearance={json.dumps(str(tmp_path / 'rgb.pt'))}"
    flow_init = f"model.init_motion={json.dumps(str(tmp_path / 'flow.pt'))}"
    st_cfg = tiny(clips, tmp_path / "st", rgb_init, flow_init)
    st = build_model(st_cfg)
    lines = initialise(st, st_cfg)
    assert lines[0].startswith(f"init_appearance {tmp_path / 'rgb.pt'}: ")
    target = st.state_dict()
    for stream, net in (("appearance", rgb_net), ("motion", flow_net)):
        for k, v in net.state_dict().items():
            got = target[f"{stream}.{k}"]
            if got.ndim == 5:  # conv2_2 ... conv5_2 1x1 filters inflated over 3 chunks (eq. 5)
                assert got.shape == (*v.shape[:2], 3, 1, 1), k
                assert all(torch.equal(got[:, :, t], v / 3) for t in range(3)), k
            else:
                assert torch.equal(got, v), (stream, k)
    assert sum(v.ndim == 5 for v in target.values()) == 16


def unset(clips: Path, out: Path, *extra: str, config: str = "st-resnet"):
    """Like `tiny` but leaving width, num_classes and flow_stack to the data and checkpoints."""
    sets = [
        f"data.root={json.dumps(str(clips))}", f"run.out={json.dumps(str(out))}",
        "data.num_workers=0", "data.crop_size=32", "model.bn_sub_batch=0", "model.init=''",
        "model.init_appearance=''", "model.init_motion=''", "run.progress=false",
    ]  # fmt: skip
    return load_config(config, sets + list(extra))


def fake_checkpoint(path: Path, cfg) -> Path:
    """A strnet training checkpoint of `cfg` (resolved: width, classes, flow stack set)."""
    torch.save({"config": to_dict(cfg), "model": build_model(cfg).state_dict()}, path)
    return path


def test_classes_come_from_both_lists_and_the_metadata(clips, tmp_path):
    cfg = unset(clips, tmp_path / "r", config="motion")
    assert cfg.model.num_classes == 0 and cfg.model.width == 0  # defaults: from data / init
    classes, notes = resolve_run(cfg, open_data(str(clips)))
    assert classes == ["c0", "c1"] and cfg.model.num_classes == 2 and cfg.model.width == 64
    # a label only in the test list counts; its video's metadata names another label: "2"
    test_list = tmp_path / "test.txt"
    test_list.write_text("c0/v_c0_g00 10 0\nc1/v_c1_g00 10 2\n")
    cfg = unset(clips, tmp_path / "r", f"data.test_list={json.dumps(str(test_list))}")
    assert resolve_run(cfg, open_data(str(clips)))[0] == ["c0", "c1", "2"]
    r = CliRunner().invoke(train_command, ["motion", "--set", f"data.root={json.dumps(str(clips))}",
                                           "--set", "model.num_classes=5"])  # fmt: skip
    assert r.exit_code == 1
    assert r.output.strip() == (
        "Error: model.num_classes is 5 but the data has 2 classes "
        f"(labels 0-1 in {clips / 'train_split1.txt'})"
    )


def test_architecture_is_inherited_from_strnet_init_checkpoints(clips, tmp_path):
    rgb = fake_checkpoint(tmp_path / "rgb.pt", tiny(clips, tmp_path / "a", config="appearance"))
    flow = fake_checkpoint(tmp_path / "flow.pt", tiny(clips, tmp_path / "m", config="motion"))
    inits = [f"model.init_appearance={json.dumps(str(rgb))}",
             f"model.init_motion={json.dumps(str(flow))}"]  # fmt: skip
    cfg = unset(clips, tmp_path / "st", *inits)
    resolve_run(cfg, open_data(str(clips)))
    assert (cfg.model.width, cfg.data.flow_stack, cfg.model.num_classes) == (8, 3, 2)
    assert initialise(build_model(cfg), cfg)[0].endswith("0 mismatched")
    for extra, line in [
        ("model.width=16", f"model.width is 16 but '{rgb}' (model.init_appearance) has 8"),
        ("data.flow_stack=10", f"data.flow_stack is 10 but '{flow}' (model.init_motion) has 3"),
    ]:
        with pytest.raises(ConfigError) as exc:
            resolve_run(unset(clips, tmp_path / "st", *inits, extra), open_data(str(clips)))
        assert str(exc.value) == line
    # another dataset's checkpoint (3 classes): a new classifier only when asked for
    three = tiny(clips, tmp_path / "m3", "model.num_classes=3", config="motion")
    other = fake_checkpoint(tmp_path / "three.pt", three)
    init = f"model.init={json.dumps(str(other))}"
    with pytest.raises(ConfigError) as exc:
        resolve_run(unset(clips, tmp_path / "x", init, config="motion"), open_data(str(clips)))
    assert str(exc.value) == (
        f"model.num_classes: the data has 2 classes but '{other}' (model.init) has 3; "
        "set model.num_classes=2 for a new head"
    )
    cfg = unset(clips, tmp_path / "x", init, "model.num_classes=2", config="motion")
    _, notes = resolve_run(cfg, open_data(str(clips)))
    assert notes == [f"'{other}' (model.init): 3 classes, the data 2: new classifier"]
    assert initialise(build_model(cfg), cfg)[0].endswith("2 mismatched")  # fc.weight, fc.bias


def test_validation_keeps_the_best_checkpoint_through_a_resume(clips, tmp_path):
    base = [
        "optim.batch_size=2", "optim.micro_batch=2", "optim.lrs=[0.05]", "optim.iterations=[5]",
        "run.val_every=2", "data.test_chunks=2",
    ]  # fmt: skip
    full = train(tiny(clips, tmp_path / "full", *base, config="motion"))
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    vals = [(r["step"], r["val_top1"]) for r in rows if "val_top1" in r]
    assert [s for s, _ in vals] == [2, 4, 5]  # every 2 steps and at the end
    top = max(v for _, v in vals)
    assert full["best"] == {"step": next(s for s, v in vals if v == top), "val_top1": top}
    best = load_checkpoint(tmp_path / "full" / "best.pt")
    assert best["step"] == full["best"]["step"] and best["best"] == full["best"]
    assert load_checkpoint(tmp_path / "full" / "checkpoint.pt")["best"] == full["best"]
    train(tiny(clips, tmp_path / "part", *base, "run.max_steps=4", config="motion"))
    resumed = train(tiny(clips, tmp_path / "part", *base, config="motion"), resume=True)
    assert resumed["best"] == full["best"]
    assert resumed["weights_digest"] == full["weights_digest"]
    again = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == [1, 2, 3, 4, 5]  # no step logged twice
    assert [(r["step"], r["val_top1"]) for r in again if "val_top1" in r] == vals
    log = tmp_path / "killed.jsonl"  # a run killed at step 5 after its checkpoint at step 3
    log.write_text("".join(json.dumps({"step": n}) + "\n" for n in range(1, 6)))
    truncate_metrics(log, 3)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2, 3]


def test_quiet_progress_lines_short_video_warning_and_overwrite(clips, tmp_path):
    out = tmp_path / "q"
    sets = [
        f"data.root={json.dumps(str(clips))}", "data.num_workers=0", "data.crop_size=32",
        "data.flow_stack=3", "model.width=8", "model.bn_sub_batch=0", "model.init=''",
        "optim.batch_size=2", "optim.micro_batch=2", "optim.lrs=[0.01]", "optim.iterations=[4]",
        "run.log_every=2", "data.num_chunks=4", "data.tau_min=2", "data.tau_max=3",
    ]  # fmt: skip
    args = ["motion", "-q", "--out", str(out)] + [x for s in sets for x in ("--set", s)]
    runner = CliRunner()
    r = runner.invoke(train_command, args)
    assert r.exit_code == 0, r.output
    lines = r.stderr.splitlines()
    # 9 flows, stacks of 3: 7 positions; 4 chunks need 1 + 3 * tau of them
    warned = [x for x in lines if x.startswith("warning: ")]
    assert len(warned) == 1 and re.fullmatch(
        r"warning: video 'c\d/v_c\d_g\d\d' has 7 chunk positions, too few for 4 chunks at "
        r"stride tau 2-3: tau reduced or positions padded for such videos \(warned once per run\)",
        warned[0],
    ), warned
    progress = [x for x in lines if x.startswith("train step")]
    assert len(progress) == 2 and all(
        re.fullmatch(rf"train step {n}/4 loss \d+\.\d{{3}} acc [01]\.\d\d \S+ s/step eta \d+s", x)
        for n, x in zip((2, 4), progress, strict=True)
    ), progress
    r = runner.invoke(train_command, args)
    assert r.exit_code == 1
    assert r.output.strip() == (
        f"Error: run folder '{out}' already holds checkpoint.pt: use --resume to continue it or "
        "a new --out (--overwrite replaces it)"
    )
    (out / "best.pt").write_bytes(b"old")
    r = runner.invoke(train_command, [*args, "--overwrite", "--set", "optim.iterations=[2]"])
    assert r.exit_code == 0, r.output
    assert not (out / "best.pt").exists()  # the old run's files are gone
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2]
    r = runner.invoke(train_command, [*args, "--overwrite", "--resume"])
    assert r.exit_code == 2 and "--resume continues a run and --overwrite replaces it" in r.output
