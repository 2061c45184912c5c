"""strnet.train: overfitting through the real reader, exact resume, torchrun on CPU, errors."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import strnet.train
from flowprep.shards import pack, read_index
from strnet.checkpoint import load_checkpoint
from strnet.cli import eval_command, train_command
from strnet.config import ConfigError, load_config, to_dict
from strnet.resolve import resolve_run
from strnet.runtime import open_data
from strnet.train import (
    build_model,
    initialise,
    lr_at,
    train,
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
    old = torch.load(flow, weights_only=True)  # a motion stream trained before flow_offset existed
    del old["config"]["data"]["flow_offset"]
    torch.save(old, tmp_path / "old-flow.pt")
    cfg = unset(
        clips, tmp_path / "st", f"model.init_motion={json.dumps(str(tmp_path / 'old-flow.pt'))}"
    )
    resolve_run(cfg, open_data(str(clips)))
    assert cfg.data.flow_offset == 0  # the alignment its filters were trained on, not "center"
    for extra, line in [
        ("model.width=16", f"model.width is 16 but '{rgb}' (model.init_appearance) has 8"),
        ("data.flow_stack=10", f"data.flow_stack is 10 but '{flow}' (model.init_motion) has 3"),
        (
            "data.flow_offset=0",
            f"data.flow_offset is 0 but '{flow}' (model.init_motion) has center",
        ),
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


def test_a_kill_between_checkpoint_and_best_is_repaired_on_resume(clips, tmp_path, monkeypatch):
    """save_best writes checkpoint.pt first; killed before best.pt, the resume copies it."""
    base = [
        "optim.batch_size=2", "optim.micro_batch=2", "optim.lrs=[0.05]", "optim.iterations=[3]",
        "run.val_every=2", "data.test_chunks=2",
    ]  # fmt: skip
    real = strnet.train.write_atomic

    def killed_at_best(path, write):
        if Path(path).name == "best.pt":
            raise KeyboardInterrupt  # SIGKILL between the two renames
        return real(path, write)

    monkeypatch.setattr(strnet.train, "write_atomic", killed_at_best)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(clips, tmp_path / "run", *base, config="motion"))
    monkeypatch.undo()
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["step"] == 2 and ckpt["best"]["step"] == 2  # the checkpoint knows its best
    assert not (tmp_path / "run" / "best.pt").exists()
    resumed = train(tiny(clips, tmp_path / "run", *base, config="motion"), resume=True)
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["step"] == resumed["best"]["step"] and best["best"] == resumed["best"]


def test_a_best_from_beyond_the_checkpoint_is_removed_on_resume(tmp_path):
    from strnet.train import restore_best

    torch.save({"step": 4, "best": {"step": 4, "val_top1": 0.9}}, tmp_path / "best.pt")
    note = restore_best(tmp_path, {"step": 2, "val_top1": 0.5}, step=3)
    assert note == "best.pt (step 4) was not the best the checkpoint knows: removed"
    assert not (tmp_path / "best.pt").exists()
    torch.save({"step": 2}, tmp_path / "best.pt")
    assert restore_best(tmp_path, {"step": 2, "val_top1": 0.5}, step=3) is None  # the right one
    assert (tmp_path / "best.pt").exists()


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
        "a new --out (--force replaces it)"
    )
    (out / "best.pt").write_bytes(b"old")
    r = runner.invoke(train_command, [*args, "--overwrite", "--set", "optim.iterations=[2]"])
    assert r.exit_code == 0, r.output
    assert not (out / "best.pt").exists()  # the old run's files are gone
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2]
    r = runner.invoke(train_command, [*args, "--overwrite", "--resume"])
    assert r.exit_code == 2 and "--resume continues a run and --force replaces it" in r.output


# --------------------------------------------------------------------------- issue 13
RESUME_HINT = "; --resume keeps a run's settings (--force starts it over)"
SHORT = ["optim.batch_size=2", "optim.micro_batch=2", "optim.lrs=[0.05]", "optim.iterations=[2]"]


def cli_sets(clips: Path, *extra: str) -> list[str]:
    """`--set` arguments of `tiny` for the motion phase on the CLI."""
    sets = [
        f"data.root={json.dumps(str(clips))}", "data.num_workers=0", "data.crop_size=32",
        "data.flow_stack=3", "model.width=8", "model.bn_sub_batch=0", "model.init=''",
        "run.progress=false", "run.log_every=1", *SHORT, *extra,
    ]  # fmt: skip
    return [x for s in sets for x in ("--set", s)]


def test_cuda_without_a_gpu_is_a_usage_error_in_one_line(clips, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = (
        "Error: device 'cuda' asked for but no GPU is available "
        "(torch.cuda.is_available() is False): use device cpu or auto"
    )
    runner, out = CliRunner(), tmp_path / "run"
    for args in (["--device", "cuda"], ["--set", "run.device=cuda"]):
        r = runner.invoke(train_command, ["motion", "--out", str(out), *cli_sets(clips), *args])
        assert (r.exit_code, r.output.strip()) == (2, line)
    assert not out.exists()  # refused before anything was written
    ckpt = fake_checkpoint(tmp_path / "m.pt", tiny(clips, tmp_path / "m", config="motion"))
    r = runner.invoke(
        eval_command, [str(ckpt), "--split", "1", "--data", str(clips), "--device", "cuda"]
    )
    assert (r.exit_code, r.output.strip()) == (2, line)


def test_zero_periods_and_bad_list_labels_are_one_line_naming_key_or_line(clips, tmp_path):
    runner, out = CliRunner(), tmp_path / "run"
    r = runner.invoke(
        train_command, ["motion", "--out", str(out), *cli_sets(clips, "run.log_every=0")]
    )
    assert (r.exit_code, r.output.strip()) == (1, "Error: run.log_every must be >= 1, got 0")
    lst = tmp_path / "list.txt"
    for label, sets, message in [
        ("7", ["model.num_classes=2"],
         "label 7 of 'c1/v_c1_g00' is out of range: model.num_classes is 2 (labels 0-1)"),
        ("-1", [], "label -1 of 'c1/v_c1_g00' is negative"),
        ("x", [], "label 'x' of 'c1/v_c1_g00' is not an integer"),
    ]:  # fmt: skip
        lst.write_text(f"c0/v_c0_g00 10 0\n\nc1/v_c1_g00 10 {label}\n")
        args = cli_sets(clips, f"data.train_list={json.dumps(str(lst))}", *sets)
        r = runner.invoke(train_command, ["motion", "--out", str(out), *args])
        assert (r.exit_code, r.output.strip()) == (1, f"Error: {lst}:3: {message}"), r.output
    # resumed: the run's classifier has 2 classes, a list now holds label 2
    base = [*SHORT, "model.width=8", "data.flow_stack=3"]
    train(unset(clips, out, *base, config="motion"))
    lst.write_text("c0/v_c0_g00 10 0\nc1/v_c1_g00 10 1\nc1/v_c1_g01 10 2\n")
    grown = unset(clips, out, *base, f"data.test_list={json.dumps(str(lst))}", config="motion")
    with pytest.raises(ConfigError) as exc:
        train(grown, resume=True)
    assert str(exc.value) == (
        f"{lst}:3: label 2 of 'c1/v_c1_g01' is out of range: '{out / 'checkpoint.pt'}' "
        "(the run's checkpoint) has 2 classes (labels 0-1)"
    )


def test_train_refuses_an_existing_run_folder_unless_resume_or_force(clips, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    train(tiny(clips, out, *SHORT, config="motion"))  # an empty folder is not a run
    for name in ("checkpoint.pt", "best.pt", "curves.png"):
        (out / name).unlink(missing_ok=True)
    # what a run killed before its first checkpoint leaves; a file of the user's beside it
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "old": True}) + "\n")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError) as exc:
        train(tiny(clips, out, *SHORT, config="motion"))
    assert str(exc.value) == (
        f"run folder '{out}' already holds metrics.jsonl, config.json of a run with no "
        "checkpoint to resume: use --force to replace it or a new --out"
    )
    # --force deletes nothing until the new run's data, config and model are good
    with pytest.raises(ConfigError, match="data root"):
        train(tiny(tmp_path / "typo", out, *SHORT, config="motion"), force=True)
    assert "old" in (out / "metrics.jsonl").read_text()
    runner = CliRunner()
    for flag in ("--force", "--overwrite"):  # --overwrite: the older name
        r = runner.invoke(
            train_command, ["motion", "-q", "--out", str(out), flag, *cli_sets(clips)]
        )
        assert r.exit_code == 0, r.output
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2] and not any("old" in r for r in rows)
    assert (out / "notes.txt").read_text() == "mine"
    r = runner.invoke(train_command, ["motion", "-q", "--out", str(out), *cli_sets(clips)])
    assert r.exit_code == 1 and "already holds checkpoint.pt" in r.output
    r = runner.invoke(train_command, ["motion", "--out", str(out), "--force", "--resume"])
    assert r.exit_code == 2 and "--resume continues a run and --force replaces it" in r.output


def test_resume_refuses_a_changed_batch_schedule_or_architecture(clips, tmp_path):
    out, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoint.pt"
    base = [*SHORT[:2], "optim.lrs=[0.05,0.01]", "optim.iterations=[2,4]"]
    train(tiny(clips, out, *base, "run.max_steps=2", config="motion"))
    saved = ckpt.read_bytes()
    for extra, key, new, old in [
        ("optim.batch_size=4", "optim.batch_size", 4, 2),
        ("optim.lrs=[0.1,0.01]", "optim.lrs", [0.1, 0.01], [0.05, 0.01]),
        ("optim.iterations=[3,4]", "optim.iterations", [3, 4], [2, 4]),
        ("optim.momentum=0.5", "optim.momentum", 0.5, 0.9),
        ("model.name='resnet18'", "model.name", "resnet18", "resnet50"),
        ("model.width=16", "model.width", 16, 8),
        ("data.flow_stack=2", "data.flow_stack", 2, 3),
        ("model.bn_sub_batch=1", "model.bn_sub_batch", 1, 0),
    ]:
        with pytest.raises(ConfigError) as exc:
            train(tiny(clips, out, *base, extra, "run.max_steps=4", config="motion"), resume=True)
        expected = f"{key} is {new} but '{ckpt}' (the run's checkpoint) has {old}{RESUME_HINT}"
        assert str(exc.value) == expected
    assert ckpt.read_bytes() == saved  # refused before anything changed
    r = CliRunner().invoke(
        train_command,
        ["motion", "--out", str(out), "--resume", *cli_sets(clips, "optim.batch_size=4")],
    )
    assert r.exit_code == 1
    assert r.output.strip() == (
        f"Error: optim.batch_size is 4 but '{ckpt}' (the run's checkpoint) has 2{RESUME_HINT}"
    )
    # a longer run, other logging and other augmentation are fine
    resumed = train(
        tiny(clips, out, *base, "run.log_every=2", "data.flip_p=0.0", "run.max_steps=4",
             config="motion"),
        resume=True,
    )  # fmt: skip
    assert resumed["step"] == 4


class Killed(Exception):
    """Stands for a SIGKILL in the middle of a run."""


def fake_tensorboard(monkeypatch) -> dict:
    """A `torch.utils.tensorboard` whose SummaryWriter keeps events in memory, per log dir.

    `purge_step` hides the events of that step and later, as TensorBoard's does.
    """
    events: dict[str, list] = {}

    class SummaryWriter:
        def __init__(self, log_dir, purge_step=None):
            self.rows = events.setdefault(str(log_dir), [])
            if purge_step is not None:
                self.rows[:] = [row for row in self.rows if row[1] < purge_step]

        def add_scalar(self, tag, value, step):
            self.rows.append((tag, step, value))

        def close(self):
            pass

    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = SummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    return events


def test_metrics_hold_each_step_once_after_a_kill_and_resume(clips, tmp_path, monkeypatch):
    """Killed at step 4 (checkpoint of step 3: the validation there was a new best, which writes
    one), a torn last line: the resumed run's metrics and TensorBoard events equal an
    uninterrupted run's, each step once."""
    events = fake_tensorboard(monkeypatch)
    base = [
        *SHORT[:2], "optim.lrs=[0.05,0.01]", "optim.iterations=[3,3]", "run.ckpt_every=2",
        "run.val_every=3", "data.test_chunks=2",
    ]  # fmt: skip
    full, part = tmp_path / "full", tmp_path / "part"
    train(tiny(clips, full, *base, config="motion"))
    save = strnet.train.save_checkpoint

    def save_or_die(path, state):
        if Path(path).name == "checkpoint.pt" and state["step"] == 4:
            raise Killed
        return save(path, state)

    monkeypatch.setattr(strnet.train, "save_checkpoint", save_or_die)
    with pytest.raises(Killed):
        train(tiny(clips, part, *base, config="motion"))
    monkeypatch.setattr(strnet.train, "save_checkpoint", save)
    assert load_checkpoint(part / "checkpoint.pt")["step"] == 3
    with open(part / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lr": 0.0')  # a line a kill or a full disk cut short
    train(tiny(clips, part, *base, config="motion"), resume=True)

    def rows(run: Path) -> list[dict]:
        keys = ("step", "lr", "loss", "acc", "epoch", "val_top1")
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [{k: row.get(k) for k in keys} for row in map(json.loads, lines)]

    assert [row["step"] for row in rows(part)] == [1, 2, 3, 4, 5, 6]
    assert rows(part) == rows(full)
    assert [row["step"] for row in rows(part) if row["val_top1"] is not None] == [3, 6]

    def scalars(run: Path) -> list:
        timing = ("samples_per_s", "step_s", "data_s")
        return sorted((t, s, v) for t, s, v in events[str(run / "tb")] if t not in timing)

    assert scalars(part) == scalars(full)
    tags_steps = [(t, s) for t, s, _ in scalars(part)]
    assert len(tags_steps) == len(set(tags_steps))


def test_a_planted_temp_symlink_is_not_followed(clips, tmp_path):
    out, victim = tmp_path / "run", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("precious")
    (out / ".checkpoint.pt.tmp").symlink_to(victim)
    train(tiny(clips, out, *SHORT, config="motion"))
    assert victim.read_text() == "precious"
    assert not (out / "checkpoint.pt").is_symlink()
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2


def test_a_nonfinite_loss_and_a_full_disk_are_one_line(clips, tmp_path, monkeypatch):
    runner, out = CliRunner(), tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(strnet.train, "clip_loss", lambda scores, labels, kind: sum(
            s.float().mean() for s in scores.values()) * float("nan"))  # fmt: skip
        r = runner.invoke(train_command, ["motion", "--out", str(out), *cli_sets(clips)])
    assert (r.exit_code, r.output.strip()) == (1, "Error: loss is nan at step 1; lower optim.lrs")

    def full_disk(path, write):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(strnet.train, "write_atomic", full_disk)
    r = runner.invoke(train_command, ["motion", "--out", str(out), "--force", *cli_sets(clips)])
    assert (r.exit_code, r.output.strip()) == (
        1, f"Error: {out / 'config.json'}: {os.strerror(errno.ENOSPC)}"
    )  # fmt: skip
