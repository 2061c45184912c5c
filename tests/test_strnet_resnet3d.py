"""3D ResNets (Hara et al. 2017): Table 1 shapes and parameters, clip sampling, training, eval."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from flowprep.reader import open_reader
from flowprep.shards import pack
from strnet.cli import eval_command, summary_command
from strnet.clips3d import (
    KINETICS_MEAN,
    MULTISCALE_SCALES,
    Clip3dConfig,
    Clip3dDataset,
    corner_crop_box,
    train_clip_frames,
    window_frames,
    window_log_probs,
)
from strnet.config import ConfigError, load_config
from strnet.evaluate import evaluate
from strnet.models import create_model, is_3d
from strnet.resnet3d import ShortcutA, loop_frames
from strnet.train import train
from strnet.weights import load_pretrained

# --------------------------------------------------------------------------- Table 1
# Table 1 of the paper, written out: blocks per stage and channels; conv1 7x7x7, 64.
TABLE_1 = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
CHANNELS = (64, 128, 256, 512)


def table1_parameters(depth: int, num_classes: int = 400, width: int = 64) -> int:
    """Parameters of the Table 1 network counted by hand, without building it.

    conv1 7x7x7 (3 -> w, no bias) + BN (scale and shift per channel); every block two 3x3x3
    convs without bias, each followed by BN; type-A shortcuts hold nothing; fc 8w -> K + bias.
    """
    total = 3 * width * 7**3 + 2 * width
    cin = width
    for blocks, c in zip(TABLE_1[depth], (width * m for m in (1, 2, 4, 8)), strict=True):
        for b in range(blocks):
            total += (cin if b == 0 else c) * c * 27 + 2 * c  # first conv (+ BN)
            total += c * c * 27 + 2 * c  # second conv (+ BN)
        cin = c
    return total + 8 * width * num_classes + num_classes


@pytest.mark.parametrize(("depth", "count"), [(18, 33_235_280), (34, 63_544_912)])
def test_parameter_counts_match_table_1_by_hand(depth, count):
    """3D ResNet-18: 33,235,280 and 3D ResNet-34: 63,544,912 parameters at 400 classes."""
    assert table1_parameters(depth) == count
    with torch.device("meta"):  # no memory, no init cost: only the shapes
        net = create_model(f"resnet3d{depth}", num_classes=400)
    assert sum(p.numel() for p in net.parameters()) == count
    assert not any(".downsample." in k for k, _ in net.named_parameters())  # type A: free
    assert table1_parameters(depth, num_classes=7, width=4) == sum(
        p.numel() for p in create_model(f"resnet3d{depth}", num_classes=7, width=4).parameters()
    )


@pytest.mark.parametrize("depth", [18, 34])
def test_output_shapes_for_16x112x112(depth):
    """(B, 3, 16, 112, 112) -> (B, 400); stage sizes T x H x W as Table 1's strides give them."""
    with torch.device("meta"):
        net = create_model(f"resnet3d{depth}", num_classes=400).eval()
        seen = {}
        for name in ("conv1", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            getattr(net, name).register_forward_hook(
                lambda m, a, out, name=name: seen.__setitem__(name, tuple(out.shape[1:]))
            )
        out = net(torch.empty(2, 3, 16, 112, 112))
    assert out.shape == (2, 400)
    assert seen == {
        "conv1": (64, 16, 56, 56),  # stride 1 in time, 2 in space
        "maxpool": (64, 8, 28, 28),  # 3x3x3, stride 2
        "layer1": (64, 8, 28, 28),
        "layer2": (128, 4, 14, 14),
        "layer3": (256, 2, 7, 7),
        "layer4": (512, 1, 4, 4),
    }


def test_short_clips_are_looped_and_bad_input_is_one_line():
    torch.manual_seed(0)
    net = create_model("resnet3d18", num_classes=3, width=4).eval()
    x = torch.randn(1, 3, 5, 32, 32)
    with torch.no_grad():
        looped = net(x[:, :, [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0]])
        torch.testing.assert_close(net(x), looped)  # 5 frames looped to 16, as the paper
        assert net(torch.randn(2, 3, 20, 40, 32)).shape == (2, 3)  # longer, other sizes: fine
    assert loop_frames(3, 7) == [0, 1, 2, 0, 1, 2, 0]
    with pytest.raises(ValueError, match=r"expected clips \(B, 3, T, H, W\), got shape"):
        net(torch.randn(2, 16, 3, 32, 32))
    with pytest.raises(ValueError, match="floating-point"):
        net(torch.zeros(1, 3, 16, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="depth must be one of"):
        from strnet.resnet3d import resnet3d

        resnet3d(50)
    with pytest.raises(ValueError, match="unknown argument 'flow_stack'"):
        create_model("resnet3d18", flow_stack=10)


def test_type_a_shortcut_is_strided_identity_with_zero_channels():
    x = torch.randn(2, 4, 5, 7, 6)
    out = ShortcutA(4, 8, 2)(x)
    assert out.shape == (2, 8, 3, 4, 3)  # ceil(n / 2), as the strided 3x3x3 conv
    torch.testing.assert_close(out[:, :4], x[:, :, ::2, ::2, ::2])
    assert out[:, 4:].abs().sum() == 0


def test_2d_resnet_weights_inflate_over_time(tmp_path):
    """I3D-style init from a 2D ResNet-18 file (torchvision keys): each filter repeated over the
    kernel depth and divided by it, so on a clip constant in time conv1 gives the 2D response;
    BN and fc copied; the 2D projection shortcuts (absent with type A) skipped."""
    torch.manual_seed(0)
    net2d = create_model("resnet18", num_classes=1000, width=4, in_channels=3)
    path = tmp_path / "resnet18.pth"
    torch.save(net2d.state_dict(), path)
    net = create_model("resnet3d18", num_classes=5, width=4).eval()
    report = load_pretrained(net, path)
    assert "layer2.0.downsample.0.weight" not in report.loaded + report.missing
    assert "layer3.1.conv2.weight" in report.adapted and "fc.weight" in report.mismatched[0]
    torch.testing.assert_close(net.layer3[1].bn1.running_var, net2d.layer3[1].bn1.running_var)
    w2d = net2d.conv1.weight
    torch.testing.assert_close(net.conv1.weight.sum(2), w2d)  # divided by the depth, 7
    frame = torch.randn(1, 3, 32, 32)
    clip = frame[:, :, None].expand(-1, -1, 16, -1, -1)
    out3d = net.conv1(clip)[:, :, 8]  # a middle frame: all 7 taps inside the clip
    out2d = torch.nn.functional.conv2d(frame, w2d, stride=2, padding=3)
    torch.testing.assert_close(out3d, out2d, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- sampling
def test_training_clip_is_16_consecutive_frames_looped_when_short():
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(200):
        f = train_clip_frames(40, 16, rng)
        assert list(f) == list(range(f[0], f[0] + 16))
        starts.add(int(f[0]))
    assert starts == set(range(25))  # uniform over every start that fits
    assert list(train_clip_frames(6, 16, rng)) == [0, 1, 2, 3, 4, 5] * 2 + [0, 1, 2, 3]


def test_test_windows_are_non_overlapping_and_the_last_is_looped():
    w = window_frames(40, 16)
    assert w.shape == (3, 16)
    assert list(w[0]) == list(range(16)) and list(w[1]) == list(range(16, 32))
    assert list(w[2]) == [32, 33, 34, 35, 36, 37, 38, 39] * 2
    assert window_frames(32, 16).shape == (2, 16)
    assert list(window_frames(5, 16)[0]) == [0, 1, 2, 3, 4] * 3 + [0]
    assert list(window_frames(40, 16, "center")[0]) == list(range(12, 28))


def test_multiscale_corner_crops():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(400):
        box = corner_crop_box(60, 80, rng)
        assert box.h == box.w and box.h in {round(60 * s) for s in MULTISCALE_SCALES}
        assert (box.y, box.x) in {
            (0, 0), (0, 80 - box.w), (60 - box.h, 0), (60 - box.h, 80 - box.w),
            ((60 - box.h) // 2, (80 - box.w) // 2),
        }  # fmt: skip
        seen.add((box.h, box.y, box.x))
    expected = set()
    for side in {round(60 * s) for s in MULTISCALE_SCALES}:  # 5 scales x 5 positions
        ys, xs = (
            (0, 0, 60 - side, 60 - side, (60 - side) // 2),
            (0, 80 - side, 0, 80 - side, (80 - side) // 2),
        )
        expected |= {(side, y, x) for y, x in zip(ys, xs, strict=True)}
    assert seen == expected  # every one drawn (at scale 1 the corners of a column coincide)


# --------------------------------------------------------------------------- the reader
def write_clips(root: Path, per_class: int = 3, size: tuple[int, int] = (32, 40)) -> Path:
    """Frame folders of 2 classes told apart by the colour of a moving square; videos of 10
    (looped), 16 and 23 frames; train and test lists list them all."""
    rng = np.random.default_rng(0)
    h, w = size
    lines = []
    for label, colour in enumerate([(200, 40, 40), (40, 40, 200)]):
        for g in range(per_class):
            vid = f"c{label}/v{g}"
            d = root / vid
            d.mkdir(parents=True)
            n = (10, 16, 23)[g % 3]
            for k in range(n):
                img = rng.integers(0, 60, size=(h, w, 3)).astype(np.uint8)
                y, x = 4 + k % 8, 2 + (2 * k) % 16
                img[y : y + 14, x : x + 14] = colour
                cv2.imwrite(str(d / f"img_{k + 1:05d}.jpg"), img[..., ::-1])
            meta = {
                "video_id": vid, "source": f"{vid}.avi", "label": f"c{label}",
                "label_index": label, "width": w, "height": h, "num_frames": n, "num_flows": 0,
                "index_base": 1, "settings": {}, "settings_hash": "test",
            }  # fmt: skip
            (d / "meta.json").write_text(json.dumps(meta))
            (d / ".done").write_text(json.dumps({"settings_hash": "test"}))
            lines.append(f"{vid} {n} {label}")
    for name in ("train_split1.txt", "test_split1.txt"):
        (root / name).write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    return write_clips(tmp_path_factory.mktemp("clips3d"))


def test_dataset_reads_clips_through_the_reader(clips):
    reader = open_reader(clips)
    items = [("c0/v0", 0), ("c1/v2", 1)]
    ds = Clip3dDataset(reader, items, Clip3dConfig(crop_size=32), train=True, seed=1)
    a, b = ds[0], ds[(0, 0)]
    assert a["clip"].shape == (3, 16, 32, 32) and a["clip"].dtype == torch.float32
    torch.testing.assert_close(a["clip"], b["clip"])  # the same draw for the same (epoch, index)
    test = Clip3dDataset(reader, items, Clip3dConfig(crop_size=32), train=False)
    assert test[0]["clips"].shape == (1, 3, 16, 32, 32)  # 10 frames: one looped window
    assert test[1]["clips"].shape == (2, 3, 16, 32, 32)  # 23 frames: 16 + 7 looped
    # centre crop at the maximum scale (32 x 32 of 32 x 40), mean subtracted, frame 0 first
    frame = reader["c1/v2"].rgb([0])[0][:, 4:36].astype(np.float32) - KINETICS_MEAN
    torch.testing.assert_close(test[1]["clips"][0, :, 0], torch.from_numpy(frame).permute(2, 0, 1))
    with pytest.raises(ValueError, match="3D clips need data.crop"):
        Clip3dDataset(reader, items, Clip3dConfig(crop="appearance"))


def test_window_probabilities_are_averaged():
    torch.manual_seed(0)
    net = create_model("resnet3d18", num_classes=4, width=4).eval()
    clips = torch.randn(3, 3, 16, 32, 32)
    with torch.no_grad():
        probs = torch.softmax(net(clips), 1).mean(0)
    got = window_log_probs(net, clips, "cpu", torch.autocast("cpu", enabled=False), batch=2)
    torch.testing.assert_close(torch.softmax(got, 0), probs)


# --------------------------------------------------------------------------- train + eval
def tiny3d(root: Path, out: Path, *extra: str, config: str = "resnet3d18-kinetics"):
    sets = [
        f"data.root={json.dumps(str(root))}", f"run.out={json.dumps(str(out))}",
        "data.num_workers=0", "data.crop_size=32", "model.width=8", "run.progress=false",
        "run.log_every=1", "optim.batch_size=6", "optim.micro_batch=6", "optim.lrs=[0.05]",
        "optim.iterations=[20]", "optim.weight_decay=0.0", "run.val_every=0",
    ]  # fmt: skip
    return load_config(config, sets + list(extra))


def test_shipped_3d_phases_follow_the_paper():
    for depth in (18, 34):
        cfg = load_config(f"resnet3d{depth}-kinetics")
        assert cfg.model.name == f"resnet3d{depth}" and is_3d(cfg.model.name)
        o = cfg.optim
        assert (o.batch_size, o.momentum, o.weight_decay) == (256, 0.9, 1e-3)
        assert cfg.optim.lrs == [0.1, 0.01, 0.001, 0.0001]  # 0.1, divided by 10 three times
        assert (cfg.data.crop, cfg.data.crop_size, cfg.data.use_flow) == ("multiscale", 112, False)


def test_tiny_3d_resnet_overfits_through_shards_and_evaluates(clips, tmp_path):
    """Packed into HDF5 shards and read back by flowprep's reader; then `strnet eval`."""
    shards = tmp_path / "shards"
    pack(clips, shards, shard_size=50_000)
    torch.manual_seed(0)
    summary = train(tiny3d(shards, tmp_path / "run", "run.precise_bn=3"))  # BN stats at the end
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["step"] == 20 and summary["classes"] == ["c0", "c1"]
    assert np.mean([r["loss"] for r in rows[-3:]]) < 0.5 * np.mean([r["loss"] for r in rows[:3]])
    assert [r["acc"] for r in rows[-3:]] == [1.0, 1.0, 1.0]
    ckpt = tmp_path / "run" / "checkpoint.pt"
    result = evaluate(ckpt, str(shards), 1, protocol="paper", out=tmp_path / "eval")
    assert result["top1"] == 1.0 and result["num_videos"] == 6
    saved = np.load(tmp_path / "eval" / "run_split1_scores.npz", allow_pickle=False)
    probs = np.exp(saved["scores_appearance"])
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)  # log of averaged probabilities
    r = CliRunner().invoke(
        eval_command, [str(ckpt), "--split", "1", "--data", str(clips), "--protocol", "center"]
    )
    assert r.exit_code == 0, r.output
    assert "split 1: top-1 1.0000" in r.output


def test_3d_resume_is_exact(clips, tmp_path):
    """Stopped at step 2 and resumed: the weights of an uninterrupted 5-step run (the clip draws
    are seeded by (seed, epoch, video), as the 2D samples)."""
    base = ["optim.batch_size=4", "optim.micro_batch=2", "optim.lrs=[0.05,0.01]",
            "optim.iterations=[3,10]", "run.ckpt_every=100"]  # fmt: skip
    full = train(tiny3d(clips, tmp_path / "full", *base, "run.max_steps=5"))
    part = train(tiny3d(clips, tmp_path / "part", *base, "run.max_steps=2"))
    assert part["weights_digest"] != full["weights_digest"]
    resumed = train(tiny3d(clips, tmp_path / "part", *base, "run.max_steps=5"), resume=True)
    assert resumed["step"] == 5 and resumed["weights_digest"] == full["weights_digest"]


def test_3d_config_errors_are_one_line(clips, tmp_path):
    with pytest.raises(ConfigError, match="reads RGB clips"):
        train(tiny3d(clips, tmp_path / "a", "data.use_flow=true"))
    with pytest.raises(ValueError, match="3D clips need data.crop multiscale or center"):
        train(tiny3d(clips, tmp_path / "b", "data.crop=appearance"))


def test_summary_of_a_3d_resnet():
    r = CliRunner().invoke(summary_command, ["resnet3d18", "--base-width", "8"])
    assert r.exit_code == 0, r.output
    assert "1 clip of 16 frames of 112 x 112" in r.output
    assert "clip        conv1    56 x 56 x 16, 8" in r.output
    assert "clip        conv5_x  4 x 4 x 1, 64" in r.output
    assert "clip        fc       1 x 1 x 1, 400" in r.output
    assert f"parameters: {table1_parameters(18, width=8):,}" in r.output


def test_predict_scores_raw_videos_as_extract_then_eval(tmp_path):
    """`strnet predict` on a 3D checkpoint: the same sliding-window scores as `flowprep extract`
    + `strnet eval` (the predictor reuses eval's loader, so 3D needs nothing of its own)."""
    from flowprep.cli import main as flowprep_main
    from pipelines.synthetic import moving_shapes, write_video
    from strnet.predict import Predictor, predict
    from strnet.scores import load_scores

    videos = tmp_path / "videos"
    for label, velocity in enumerate([(2.0, 0.0), (0.0, 2.0)]):
        frames = moving_shapes(20, 40, 48, velocity=velocity, seed=label)
        write_video(videos / f"c{label}" / "v0.avi", frames, threads=1)
    frames = tmp_path / "frames"
    r = CliRunner().invoke(
        flowprep_main,
        [
            "extract",
            str(videos),
            "-o",
            str(frames),
            "--modality",
            "rgb",
            "--short-side",
            "32",
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    lists = [f"data.{k}_list={json.dumps(str(frames / 'all.txt'))}" for k in ("train", "test")]
    torch.manual_seed(0)
    cfg = tiny3d(frames, tmp_path / "run", *lists, "optim.batch_size=2", "optim.micro_batch=2",
                 "optim.iterations=[2]", "run.precise_bn=1")  # fmt: skip
    train(cfg)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    evaluate(ckpt, str(frames), 1, protocol="paper", out=tmp_path / "eval",
             test_list=str(frames / "all.txt"))  # fmt: skip
    saved = load_scores(tmp_path / "eval" / "run_split1_scores.npz")
    predictor = Predictor([ckpt], protocol="paper", device="cpu", flags={"short_side": 32})
    results = predict(predictor, [videos])
    assert [r.status for r in results] == ["done", "done"]
    assert not predictor.settings.wants_flow
    for n, result in enumerate(results):
        np.testing.assert_allclose(
            result.streams["appearance"], saved.streams["appearance"][n], rtol=1e-5, atol=1e-5
        )
