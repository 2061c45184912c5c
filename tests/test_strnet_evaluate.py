"""strnet.evaluate: the paper's test protocol, metrics, fusion and the eval command."""

from __future__ import annotations

import json
import shutil
from contextlib import nullcontext
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_strnet_train import tiny, write_clip_folder

from strnet.cli import eval_command
from strnet.config import ConfigError
from strnet.data import hflip_normalized_flow
from strnet.evaluate import (
    evaluate,
    mean_over_splits,
    summarize,
    topk_accuracy,
    video_scores,
    video_views,
)
from strnet.scores import load_scores, save_scores
from strnet.train import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny two-stream model fitted to the generated clips, and their folder.

    Frames are square so the paper protocol's whole frames have the training crops' size: a
    width-8 ResNet-50 on 32-pixel inputs has a 1x1 conv5 map and does not carry over to other
    sizes (the whole-frame arithmetic is tested on the model in test_strnet_models). Precise BN
    re-estimates the BN statistics, which lag far behind weights fitted in 25 steps.
    """
    root = tmp_path_factory.mktemp("eval")
    clips = write_clip_folder(root / "clips", size=(32, 32))
    torch.manual_seed(0)
    cfg = tiny(
        clips, root / "run", "data.num_chunks=2", "data.tau_min=1", "data.tau_max=3",
        "optim.batch_size=6", "optim.micro_batch=6", "optim.lrs=[0.05]", "optim.iterations=[25]",
        "run.precise_bn=4",
    )  # fmt: skip
    train(cfg)
    return root / "run" / "checkpoint.pt", clips


def test_topk_and_per_class_metrics():
    scores = np.array([[3.0, 2.0, 1.0], [0.0, 1.0, 5.0], [2.0, 3.0, 1.0], [1.0, 3.0, 2.0]])
    labels = np.array([0, 1, 1, 0])
    assert topk_accuracy(scores, labels, 1) == 0.5
    assert topk_accuracy(scores, labels, 2) == 0.75
    assert topk_accuracy(scores, labels, 5) == 1.0
    s = summarize(scores, labels)
    assert s["per_class"] == [0.5, 0.5, None]
    assert s["confusion"] == [[1, 1, 0], [0, 1, 1], [0, 0, 0]]
    assert (
        mean_over_splits(
            [{"split": 1, "top1": 0.5, "top5": 1.0}, {"split": 2, "top1": 1.0, "top5": 1.0}]
        )["top1"]
        == 0.75
    )


class FixedTwoStream(torch.nn.Module):
    """Scores that depend on the input so averaging order is visible."""

    def forward(self, rgb, flow):
        a = rgb.mean(dim=(2, 3, 4))[..., None] * torch.tensor([1.0, -1.0])
        m = flow[..., 0, :, :1].mean(dim=(2, 3))[..., None] * torch.tensor([2.0, 0.0])
        return {"appearance": a, "motion": m}


def test_scores_average_views_and_positions_before_softmax():
    rng = torch.Generator().manual_seed(0)
    sample = {"rgb": torch.randn(25, 3, 8, 10, generator=rng),
              "flow": torch.randn(25, 6, 8, 10, generator=rng).round()}  # fmt: skip
    views = video_views(sample, flips=True)
    assert views["rgb"].shape == (2, 25, 3, 8, 10)
    torch.testing.assert_close(views["flow"][1], hflip_normalized_flow(sample["flow"]))
    out = video_scores(FixedTwoStream(), views, True, "cpu", nullcontext())
    expected_a = views["rgb"].mean(dim=(2, 3, 4)).mean() * torch.tensor([1.0, -1.0])
    torch.testing.assert_close(out["appearance"], expected_a)
    flow_left = views["flow"][..., 0, :, :1].mean(dim=(2, 3)).mean()
    torch.testing.assert_close(out["motion"], flow_left * torch.tensor([2.0, 0.0]))


@pytest.mark.parametrize("protocol", ["paper", "center"])
def test_evaluate_fitted_model(trained, tmp_path, protocol):
    ckpt, clips = trained
    r = evaluate(ckpt, str(clips), 1, protocol=protocol, test_chunks=5, out=tmp_path)
    assert r["num_videos"] == 6 and r["top5"] == 1.0
    assert r["top1"] == 1.0 and r["per_class"] == {"c0": 1.0, "c1": 1.0}
    assert set(r["streams"]) == {"appearance", "motion"}
    assert r["name"] == "run" and r["classes"] == ["c0", "c1"]  # the run folder's name
    assert (tmp_path / "run_split1_confusion.png").stat().st_size > 1000
    assert json.loads((tmp_path / "run_split1.json").read_text())["top1"] == 1.0


def test_eval_command_and_its_errors(trained, tmp_path):
    ckpt, clips = trained
    runner = CliRunner()
    r = runner.invoke(eval_command, [str(ckpt), "--split", "1", "--data", str(clips),
                                     "--protocol", "center", "--test-chunks", "3"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert r.output.startswith("split 1: top-1 1.0000  top-5 1.0000")
    r = runner.invoke(eval_command, [str(tmp_path / "no.pt"), "--split", "1", "--data",
                                     str(clips)])  # fmt: skip
    assert r.exit_code == 1
    assert r.output.strip() == f"Error: checkpoint '{tmp_path / 'no.pt'}' not found"
    r = runner.invoke(eval_command, [str(ckpt), "--split", "2", "--data", str(clips)])
    assert r.exit_code == 1
    assert r.output.strip() == (
        f"Error: test list '{clips / 'test_split2.txt'}' not found (set data.test_list)"
    )
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    r = runner.invoke(eval_command, [str(garbage), "--split", "1", "--data", str(clips)])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1
    assert r.output.startswith(f"Error: cannot read checkpoint '{garbage}'")


def test_fuse_averages_separately_trained_streams(trained, tmp_path):
    """Table 3's two-stream column: appearance and motion phases fused at test time."""
    _, clips = trained
    short = ["optim.batch_size=2", "optim.micro_batch=2", "optim.lrs=[0.01]",
             "optim.iterations=[2]"]  # fmt: skip
    paths = []
    for phase in ("appearance", "motion"):
        train(tiny(clips, tmp_path / phase, *short, config=phase))
        paths.append(tmp_path / phase / "checkpoint.pt")
    fused = evaluate(paths, str(clips), 1, protocol="center", test_chunks=3)
    alone = [evaluate(p, str(clips), 1, protocol="center", test_chunks=3) for p in paths]
    assert set(fused["streams"]) == {"appearance", "motion"}
    assert fused["streams"]["appearance"] == alone[0]["streams"]["appearance"]
    assert fused["streams"]["motion"] == alone[1]["streams"]["motion"]
    runner = CliRunner()
    args = [str(p) for p in paths] + ["--split", "1", "--data", str(clips), "--protocol",
                                      "center", "--test-chunks", "3"]  # fmt: skip
    r = runner.invoke(eval_command, [*args, "--fuse"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"split 1: top-1 {fused['top1']:.4f}")
    r = runner.invoke(eval_command, [*args, "--split", "2", "--fuse"])
    assert r.exit_code == 2 and "--fuse evaluates all CHECKPOINTS together" in r.output

    # saved scores fuse without data or model, exactly as the checkpoints do
    saved = tmp_path / "eval"
    for p in paths:
        evaluate(p, str(clips), 1, protocol="center", test_chunks=3, out=saved)
    fused = evaluate(paths, str(clips), 1, protocol="center", test_chunks=3, out=saved)
    assert fused["name"] == "appearance+motion"
    npz = [str(saved / f"{k}_split1_scores.npz") for k in ("appearance", "motion")]
    r = runner.invoke(eval_command, [*npz, "--fuse", "--split", "1", "--out",
                                     str(tmp_path / "f"), "--name", "two-stream"])  # fmt: skip
    assert r.exit_code == 0, r.output
    again = json.loads((tmp_path / "f" / "two-stream_split1.json").read_text())
    assert again["top1"] == fused["top1"] and again["per_class"] == fused["per_class"]
    assert again["confusion"] == fused["confusion"] and again["streams"] == fused["streams"]
    a = load_scores(saved / "appearance+motion_split1_scores.npz")
    b = load_scores(tmp_path / "f" / "two-stream_split1_scores.npz")
    np.testing.assert_allclose(a.fused(), b.fused(), rtol=1e-6, atol=1e-6)
    # streams of the same name stay apart, prefixed by their input's name
    evaluate(trained[0], str(clips), 1, protocol="center", test_chunks=3, out=saved)
    both = evaluate([saved / "run_split1_scores.npz", npz[0]], None, 1)
    assert set(both["streams"]) == {"run.appearance", "appearance.appearance", "motion"}
    # scores of other videos or classes: one line naming the file
    for field, value in (("video_ids", a.video_ids[::-1]), ("class_names", ["x", "y"])):
        odd = tmp_path / f"odd_{field}_split1_scores.npz"
        save_scores(odd, replace(load_scores(npz[1]), **{field: value}))
        r = runner.invoke(eval_command, [npz[0], str(odd), "--fuse", "--split", "1"])
        what = field.replace("_", " ")
        assert r.exit_code == 1 and r.output.strip() == (
            f"Error: '{odd}': {what} differ from those of '{npz[0]}'"
        )


def test_eval_outputs_are_named_and_scores_load_without_pickles(trained, tmp_path):
    ckpt, clips = trained
    r = evaluate(ckpt, str(clips), 1, protocol="center", test_chunks=3, out=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "run_split1.json", "run_split1_confusion.png", "run_split1_scores.npz"]  # fmt: skip
    with np.load(tmp_path / "run_split1_scores.npz", allow_pickle=False) as z:
        assert set(z.files) == {"video_ids", "labels", "class_names", "protocol",
                                "scores_appearance", "scores_motion"}  # fmt: skip
        ids = [line.split()[0] for line in (clips / "test_split1.txt").read_text().splitlines()]
        assert z["video_ids"].dtype.kind == "U" and z["video_ids"].tolist() == ids
        assert z["labels"].dtype == np.int64 and z["labels"].tolist() == [0, 0, 0, 1, 1, 1]
        assert z["class_names"].tolist() == ["c0", "c1"] and str(z["protocol"]) == "center"
        a, m = z["scores_appearance"], z["scores_motion"]
        assert a.dtype == m.dtype == np.float32 and a.shape == m.shape == (6, 2)
        assert r["top1"] == topk_accuracy((a + m) / 2, z["labels"], 1)
    saved = json.loads((tmp_path / "run_split1.json").read_text())
    assert saved["per_class"] == r["per_class"] and set(saved["per_class"]) == {"c0", "c1"}
    other = tmp_path / "run" / "best.pt"  # another checkpoint of the run: its own name
    other.parent.mkdir()
    shutil.copy(ckpt, other)
    old = torch.load(ckpt, weights_only=True)  # from before checkpoints held class names
    del old["classes"]
    torch.save(old, tmp_path / "old.pt")
    r = evaluate(tmp_path / "old.pt", str(clips), 1, protocol="center", test_chunks=2)
    assert r["classes"] == ["c0", "c1"]  # from the videos' metadata
    runner = CliRunner()
    r = runner.invoke(
        eval_command,
        [
            str(other),
            "--split",
            "1",
            "--data",
            str(clips),
            "--out",
            str(tmp_path),
            "--protocol",
            "center",
            "--test-chunks",
            "2",
        ],
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run-best_split1_scores.npz").is_file()
    r = runner.invoke(eval_command, [str(ckpt), "--split", "1", "--data", str(clips),
                                     "--name", ".hidden"])  # fmt: skip
    assert r.exit_code == 1 and r.output.strip() == (
        "Error: --name '.hidden' is not a safe file name: use letters, digits and ._+- "
        "(not starting with .)"
    )
    with pytest.raises(ConfigError, match=r"^--name 'a/b' is not a safe file name"):
        evaluate(ckpt, str(clips), 1, name="a/b")
    r = runner.invoke(eval_command, [str(ckpt), "--split", "1"])
    assert r.exit_code == 2 and "--data is needed to evaluate checkpoints" in r.output
    r = runner.invoke(
        eval_command,
        [
            str(ckpt),
            str(other),
            "--split",
            "1",
            "--split",
            "1",
            "--data",
            str(clips),
            "--out",
            str(tmp_path),
            "--name",
            "x",
        ],
    )
    assert r.exit_code == 2 and "would both write x_split1.json" in r.output


def test_evaluate_reports_progress_video_by_video(trained):
    ckpt, clips = trained
    seen = []
    r = evaluate(ckpt, str(clips), 1, protocol="center", test_chunks=2,
                 on_start=seen.append, on_video=lambda: seen.append("scored"))  # fmt: skip
    assert seen == [r["num_videos"]] + ["scored"] * r["num_videos"]


def test_a_label_beyond_the_classifier_names_its_list_line(trained, tmp_path):
    ckpt, clips = trained
    lines = (clips / "test_split1.txt").read_text().splitlines()
    vid = lines[-1].split()[0]
    bad = tmp_path / "test.txt"
    bad.write_text("\n".join(lines[:-1] + [f"{vid} {lines[-1].split()[1]} 5"]) + "\n")
    with pytest.raises(ConfigError) as exc:
        evaluate(ckpt, str(clips), 1, test_list=str(bad))
    assert str(exc.value) == (
        f"{bad}:{len(lines)}: label 5 of {vid!r} is out of range: '{ckpt}' has 2 classes "
        "(labels 0-1)"
    )
