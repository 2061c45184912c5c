"""strnet predict: raw videos scored as extract + eval score them; ImageNet init via torch.hub."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from bad_videos import make_bad_videos
from click.testing import CliRunner
from test_strnet_train import tiny, write_clip_folder

from flowprep.cli import main as flowprep_main
from flowprep.manifest import find_videos, video_id_for
from pipelines.synthetic import moving_shapes, write_video
from strnet import weights
from strnet.cli import main as strnet_main
from strnet.config import ConfigError
from strnet.evaluate import evaluate
from strnet.models import create_model
from strnet.predict import EXTRACT_KEY, Predictor, predict
from strnet.scores import load_scores
from strnet.train import train
from strnet.weights import WeightsError, load_file, read_state_dict

SHORT = [
    "optim.batch_size=2",
    "optim.micro_batch=2",
    "optim.lrs=[0.01]",
    "optim.iterations=[2]",
    "run.precise_bn=2",
]  # BN statistics of the final weights: sane scores to compare
CHUNKS = 5  # test chunks: enough to repeat and spread positions over 12-frame videos


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Videos of 2 classes, `flowprep extract` of them, appearance and motion phases trained on
    the extracted frames, and `strnet eval`'s saved scores of each and of their fusion."""
    root = tmp_path_factory.mktemp("predict")
    videos = root / "videos"
    for label, velocity in enumerate([(2.0, 0.0), (0.0, 2.0)]):
        for g in range(2):
            frames = moving_shapes(12, 40, 48, velocity=velocity, seed=10 * label + g)
            write_video(videos / f"c{label}" / f"v{g}.avi", frames, threads=1)
    frames = root / "frames"
    r = CliRunner().invoke(flowprep_main, ["extract", str(videos), "-o", str(frames), "--modality",
                                           "both", "--short-side", "32", "-q"])  # fmt: skip
    assert r.exit_code == 0, r.output
    lists = [f"data.train_list={json.dumps(str(frames / 'all.txt'))}",
             f"data.test_list={json.dumps(str(frames / 'all.txt'))}"]  # fmt: skip
    ckpts = {}
    for phase in ("appearance", "motion"):
        torch.manual_seed(0)
        train(tiny(frames, root / phase, *SHORT, *lists, config=phase))
        ckpts[phase] = root / phase / "checkpoint.pt"
    scores = {}
    for protocol in ("paper", "center"):
        out = root / f"eval-{protocol}"
        kw = dict(protocol=protocol, test_chunks=CHUNKS, out=out, test_list=str(frames / "all.txt"))
        for phase, ckpt in ckpts.items():
            evaluate(ckpt, str(frames), 1, **kw)
            scores[protocol, phase] = load_scores(out / f"{phase}_split1_scores.npz")
        evaluate(list(ckpts.values()), str(frames), 1, **kw)
        scores[protocol, "fused"] = load_scores(out / "appearance+motion_split1_scores.npz")
    return {"videos": videos, "frames": frames, "ckpts": ckpts, "scores": scores, "root": root}


def video_paths(videos: Path) -> list[Path]:
    return [videos / rel for rel in find_videos(videos)]


def assert_same_scores(results, saved, videos: Path) -> None:
    """Predicted fused and per-stream scores equal the saved eval scores, video by video."""
    ids = [video_id_for(Path(r.video).relative_to(videos).as_posix()) for r in results]
    assert ids == saved.video_ids
    fused = saved.fused()
    for n, r in enumerate(results):
        assert r.status == "done", r.reason
        np.testing.assert_allclose(r.fused, fused[n], rtol=1e-5, atol=1e-5)
        assert set(r.streams) == set(saved.streams)
        for stream, value in saved.streams.items():
            np.testing.assert_allclose(r.streams[stream], value[n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("protocol", ["paper", "center"])
@pytest.mark.parametrize("which", ["appearance", "motion", "fused"])
def test_predict_equals_extract_then_eval(world, which, protocol):
    ckpts = [world["ckpts"][p] for p in ("appearance", "motion") if which in (p, "fused")]
    predictor = Predictor(ckpts, protocol=protocol, test_chunks=CHUNKS, device="cpu",
                          flags={"short_side": 32})  # fmt: skip
    assert predictor.classes == ["c0", "c1"]  # stored in the checkpoint at training time
    results = predict(predictor, [world["videos"]])
    assert_same_scores(results, world["scores"][protocol, which], world["videos"])
    assert predictor.settings.wants_flow == (which != "appearance")  # no flow for RGB alone
    assert all(set(r.seconds) == {"decode", "flow", "network"} for r in results)


def test_settings_carried_by_the_checkpoint(world, tmp_path):
    """Training stores its data's extract settings, so predict needs no --short-side; an option
    that disagrees wins with a note, two checkpoints that disagree are refused."""
    ckpt = torch.load(world["ckpts"]["motion"], weights_only=True)
    assert ckpt[EXTRACT_KEY] == {  # what `flowprep extract --short-side 32` wrote in meta.json
        "short_side": 32,
        "jpeg_quality": 95,
        "modality": "both",
        "flow_backend": "torch",
        "flow_bound": 20.0,
        "flow_format": "jpeg",
    }
    carried = world["ckpts"]["motion"]
    predictor = Predictor([carried], protocol="center", test_chunks=CHUNKS, device="cpu")
    assert predictor.settings.short_side == 32 and predictor.notes == []
    results = predict(predictor, [world["videos"]])
    assert_same_scores(results, world["scores"]["center", "motion"], world["videos"])
    again = Predictor([carried], protocol="center", test_chunks=CHUNKS, device="cpu",
                      flags={"short_side": 40, "flow_bound": None})  # fmt: skip
    assert again.settings.short_side == 40
    assert again.notes == [f"note: --short-side 40 overrides 32 of the extract settings "
                           f"'{carried}' was trained on"]  # fmt: skip
    ckpt[EXTRACT_KEY] = {**ckpt[EXTRACT_KEY], "short_side": 64}
    other = tmp_path / "other.pt"
    torch.save(ckpt, other)
    with pytest.raises(ConfigError, match=r"^short_side: '.*' was trained on 32 but '.*' on 64"):
        Predictor([carried, other], device="cpu")
    ckpt[EXTRACT_KEY] = {}  # a checkpoint from before the settings were stored
    bare = tmp_path / "bare.pt"
    torch.save(ckpt, bare)
    assert Predictor([bare], device="cpu").settings.short_side == 256  # extract's default


def test_predict_command_fuses_reports_a_bad_video_and_goes_on(world, tmp_path):
    videos = tmp_path / "videos"
    shutil.copytree(world["videos"], videos)
    reasons = make_bad_videos(tmp_path / "bad")
    corrupt = videos / "c1" / "corrupt.avi"
    shutil.copy(tmp_path / "bad" / "text.avi", corrupt)
    out = tmp_path / "pred.jsonl"
    args = ["predict", str(videos), "--checkpoint", str(world["ckpts"]["appearance"]),
            "--checkpoint", str(world["ckpts"]["motion"]), "--short-side", "32", "--top", "2",
            "--device", "cpu", "--test-chunks", str(CHUNKS), "--json", str(out)]  # fmt: skip
    r = CliRunner().invoke(strnet_main, args)
    assert r.exit_code == 3, r.output
    lines = r.output.strip().splitlines()
    failed = [line for line in lines if line.startswith("failed:")]
    assert len(failed) == 1 and failed[0].startswith(f"failed: {corrupt}: {reasons['text.avi']}")
    assert lines[-1] == "4 predicted, 1 failed"
    saved = world["scores"]["paper", "fused"]
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [Path(x["video"]).relative_to(videos).as_posix() for x in records] == [
        "c0/v0.avi", "c0/v1.avi", "c1/corrupt.avi", "c1/v0.avi", "c1/v1.avi"]  # fmt: skip
    assert records[2] == {"video": str(corrupt), "error": failed[0].split(": ", 2)[2]}
    good = records[:2] + records[3:]
    for n, x in enumerate(good):
        np.testing.assert_allclose(x["fused"], saved.fused()[n], rtol=1e-5, atol=1e-5)
        probs = torch.tensor(x["fused"]).double().softmax(0)
        best = int(probs.argmax())
        assert x["top"][0] == {"class": f"c{best}", "index": best,
                               "probability": pytest.approx(float(probs[best]))}  # fmt: skip
        assert len(x["top"]) == 2 and set(x["scores"]) == {"appearance", "motion"}
        line = next(line for line in lines if line.startswith(x["video"] + ":"))
        assert line == f"{x['video']}: " + ", ".join(
            f"{t['class']} {t['probability']:.4f}" for t in x["top"]
        )
    # a missing file is a bad video too; a checkpoint that is not one is one line, exit 1
    r = CliRunner().invoke(
        strnet_main,
        [
            "predict",
            str(tmp_path / "nope.avi"),
            "--checkpoint",
            str(world["ckpts"]["motion"]),
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 3 and f"failed: {tmp_path / 'nope.avi'}: file not found" in r.output
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    r = CliRunner().invoke(strnet_main, ["predict", str(videos), "--checkpoint", str(garbage)])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1
    assert r.output.startswith(f"Error: cannot read checkpoint '{garbage}'")


def test_decoding_overlaps_the_previous_video(world, monkeypatch):
    """Video n+1 is decoding (in another thread) while video n is scored."""
    predictor = Predictor([world["ckpts"]["appearance"]], protocol="center", test_chunks=2,
                          device="cpu", flags={"short_side": 32})  # fmt: skip
    paths = video_paths(world["videos"])[:2]
    decode, score = predictor.decode, predictor.score
    second_started, events = threading.Event(), []

    def watched_decode(path):
        events.append(("decode", path.name, threading.current_thread().name))
        if path == paths[1]:
            second_started.set()
        return decode(path)

    def watched_score(video):
        events.append(("score", second_started.wait(10)))
        return score(video)

    monkeypatch.setattr(predictor, "decode", watched_decode)
    monkeypatch.setattr(predictor, "score", watched_score)
    results = list(predictor.run(paths))
    assert [r.status for r in results] == ["done", "done"]
    assert events[2:] == [("score", True), ("score", True)]  # video 1 decoding before 0 scored
    assert {e[2] for e in events[:2]} == {"strnet-decode_0"}  # not the scoring thread


# --------------------------------------------------------------------------- ImageNet weights
def small_hub_file(folder: Path, name: str = "resnet50") -> tuple[Path, dict]:
    """A width-8 ResNet state dict in a file named `<name>tiny-<sha256 prefix>.pth`."""
    state = create_model(name, num_classes=7, width=8, in_channels=3).state_dict()
    tmp = folder / "tmp.pth"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    path = tmp.rename(folder / f"{name}tiny-{digest[:8]}.pth")
    return path, state


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """$TORCH_HOME in tmp_path and `imagenet` pointing at a small file:// URL: no download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(weights, "_verified", {})
    path, state = small_hub_file(tmp_path / "server")
    monkeypatch.setenv(weights.IMAGENET_URL_ENV, path.as_uri())
    return path, state, tmp_path / "torch" / "hub" / "checkpoints" / path.name


def test_imagenet_is_torchvisions_v1_file():
    assert weights.IMAGENET_URL == "https://download.pytorch.org/models/resnet50-0676ba61.pth"
    assert weights.hub_path(weights.IMAGENET_URL).name == "resnet50-0676ba61.pth"


def test_imagenet_fetched_once_into_the_hub_cache(hub, monkeypatch, tmp_path, capsys):
    source, state, cached = hub
    got = read_state_dict("imagenet")
    assert cached.is_file() and cached.read_bytes() == source.read_bytes()
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    source.unlink()  # the second run reads the cache
    monkeypatch.setattr(weights, "_verified", {})
    again = read_state_dict("imagenet")
    assert all(torch.equal(again[k], state[k]) for k in state)
    # model.init=imagenet: a phase starts from it (new 2-class head, conv1 as it is for RGB)
    frames = write_clip_folder(tmp_path / "clips")
    cfg = tiny(frames, tmp_path / "run", *SHORT, "model.init='imagenet'", config="appearance")
    capsys.readouterr()
    train(cfg)
    assert "init imagenet: " in capsys.readouterr().out
    ckpt = load_file(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["config"]["model"]["init"] == "imagenet"
    # a local path keeps working, and ./imagenet is a file, not the keyword
    local = tmp_path / "imagenet"
    shutil.copy(cached, local)
    assert read_state_dict(str(local)).keys() == state.keys()


def test_corrupt_cached_file_fails_the_hash_check_in_one_line(hub):
    source, _, cached = hub
    read_state_dict("imagenet")
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0xFF
    cached.write_bytes(bytes(data))
    with pytest.raises(WeightsError) as err:
        read_state_dict("imagenet")
    message = str(err.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"cached weights '{cached}' fail the hash check")
    assert message.endswith("delete the file to download it again")
    clips = write_clip_folder(source.parent / "clips")
    sets = [f"data.root={json.dumps(str(clips))}", "data.num_workers=0", "data.crop_size=32",
            "model.width=8", "model.init='imagenet'", "optim.batch_size=2", "optim.micro_batch=2",
            "optim.iterations=[1]", "optim.lrs=[0.01]", "run.progress=false"]  # fmt: skip
    args = ["train", "appearance", "--out", str(source.parent / "run")]
    r = CliRunner().invoke(strnet_main, args + [x for s in sets for x in ("--set", s)])
    assert r.exit_code == 1 and r.output == f"Error: {message}\n"
    cached.unlink()  # deleted: downloaded again from the (intact) source
    assert read_state_dict("imagenet")


def test_download_with_a_wrong_hash_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path, _ = small_hub_file(tmp_path / "server")
    wrong = path.with_name("resnet50tiny-00000000.pth")
    path.rename(wrong)
    monkeypatch.setenv(weights.IMAGENET_URL_ENV, wrong.as_uri())
    with pytest.raises(WeightsError, match=r"^ImageNet weights file://.*: invalid hash value"):
        load_file("imagenet")
    assert not list((tmp_path / "torch" / "hub" / "checkpoints").glob("resnet50tiny*"))
    monkeypatch.setenv(weights.IMAGENET_URL_ENV, (tmp_path / "missing-12345678.pth").as_uri())
    with pytest.raises(WeightsError, match=r"^cannot download file://.*offline, set model.init"):
        load_file("imagenet")


def test_mixed_or_missing_settings_are_not_stored():
    """Training videos prepared differently (or before meta.json held settings) store none."""
    from types import SimpleNamespace

    from strnet.resolve import data_extract_settings

    a, b = {"short_side": 256, "modality": "both"}, {"short_side": 128, "modality": "both"}
    reader = {
        "x": SimpleNamespace(meta={"settings": a}),
        "y": SimpleNamespace(meta={"settings": dict(a)}),
        "z": SimpleNamespace(meta={"settings": b}),
        "old": SimpleNamespace(meta={}),
    }
    assert data_extract_settings(reader, [("x", 0), ("y", 1)]) == (a, [])
    assert data_extract_settings(reader, [("x", 0), ("z", 1)])[0] is None
    settings, notes = data_extract_settings(reader, [("x", 0), ("old", 1)])
    assert settings is None and "'old' records no extract settings" in notes[0]
    assert data_extract_settings(reader, [("x", 0), ("gone", 1)]) == (a, [])  # not in the data


def test_imagenet_names_the_file_of_the_networks_depth(tmp_path, monkeypatch):
    """imagenet is torchvision's V1 file of the ResNet's depth: 18/34 inflate into 3D ResNets."""
    monkeypatch.delenv(weights.IMAGENET_URL_ENV, raising=False)
    names = {d: weights.hub_path(weights.imagenet_url(d)).name for d in (18, 34, 50, 101, 152)}
    assert names == {
        18: "resnet18-f37072fd.pth",
        34: "resnet34-b627a593.pth",
        50: "resnet50-0676ba61.pth",
        101: "resnet101-63fe2227.pth",
        152: "resnet152-394f9c45.pth",
    }
    depth = weights.resnet_depth
    kw = dict(num_classes=3, width=2)
    assert [depth(create_model(f"resnet{d}", **kw)) for d in (18, 34, 50)] == [18, 34, 50]
    assert [depth(create_model(f"resnet3d{d}", **kw)) for d in (18, 34)] == [18, 34]
    assert depth(create_model("vggm2048", **kw)) is None
    with pytest.raises(WeightsError, match="^imagenet: torchvision's ImageNet files are ResNets"):
        weights.load_pretrained(create_model("vggm2048", **kw), "imagenet")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(weights, "_verified", {})
    path, state = small_hub_file(tmp_path / "server", "resnet18")
    monkeypatch.setenv(weights.IMAGENET_URL_ENV, path.as_uri())
    net = create_model("resnet3d18", num_classes=3, width=8)
    report = weights.load_pretrained(net, "imagenet")
    assert "conv1.weight" in report.adapted and "fc.weight" in report.missing  # a new head
    inflated = state["conv1.weight"].unsqueeze(2).repeat(1, 1, 7, 1, 1) / 7
    assert torch.allclose(net.conv1.weight, inflated)
