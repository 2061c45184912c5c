"""Middlebury colour wheel and the `flowprep viz` panels."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from flowprep.cli import main
from flowprep.quantize import encode_flow_jpeg, quantize_flow
from flowprep.viz import color_wheel, flow_to_color, make_panel


def test_color_wheel_hues():
    wheel = color_wheel()
    assert wheel.shape == (55, 3)
    # segment starts: red, yellow, green, cyan, blue, magenta
    for index, rgb in [(0, (1, 0, 0)), (15, (1, 1, 0)), (21, (0, 1, 0)), (25, (0, 1, 1)),
                       (36, (0, 0, 1)), (49, (1, 0, 1))]:  # fmt: skip
        np.testing.assert_array_equal(wheel[index], rgb)


def test_flow_to_color_directions_and_magnitude():
    flow = np.array([[[1, 0], [0, 1], [-1, 0], [0, -1], [0, 0], [0.5, 0], [2, 0]]], np.float32)
    rgb = flow_to_color(flow, max_flow=1.0)
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 7, 3)
    assert rgb[0, 0].tolist() == [255, 0, 0]  # right: red
    assert rgb[0, 2].tolist() == [0, 209, 255]  # left: cyan-blue, opposite
    assert rgb[0, 4].tolist() == [255, 255, 255]  # no motion: white
    assert rgb[0, 5].tolist() == [255, 128, 128]  # half magnitude: half saturated
    assert rgb[0, 6].tolist() == [191, 0, 0]  # beyond max_flow: darkened by 0.75
    assert rgb[0, 1, 0] > rgb[0, 1, 2] and rgb[0, 3, 2] > rgb[0, 3, 0]  # down warm, up blue
    nan = flow_to_color(np.full((2, 2, 2), np.nan, np.float32))
    assert (nan == 0).all()
    with pytest.raises(ValueError, match=r"\(H, W, 2\)"):
        flow_to_color(np.zeros((4, 4)))


def write_folder(folder, flow, bound):
    folder.mkdir(parents=True)
    h, w = flow.shape[:2]
    frame = np.full((h, w, 3), (10, 200, 30), np.uint8)
    cv2.imwrite(str(folder / "img_00001.jpg"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    q = quantize_flow(flow, bound)
    for c, kind in enumerate(("flow_x", "flow_y")):
        (folder / f"{kind}_00001.jpg").write_bytes(encode_flow_jpeg(q[..., c]))
    (folder / "meta.json").write_text(json.dumps({"flow_bound": bound}))
    return frame, q


def test_viz_command_writes_panels(tmp_path):
    flow = np.zeros((24, 32, 2), np.float32)
    flow[:, :16, 0] = 4.0  # left half moves right by 4 px
    frame, q = write_folder(tmp_path / "cls" / "vid", flow, bound=8.0)
    result = CliRunner().invoke(main, ["viz", str(tmp_path / "cls" / "vid"), str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    panel = cv2.cvtColor(cv2.imread(str(tmp_path / "o" / "viz_00001.png")), cv2.COLOR_BGR2RGB)
    assert panel.shape == (24, 128, 3)
    expected = make_panel(frame, q[..., 0], q[..., 1], bound=8.0)
    color = panel[:, 32:64].astype(int)
    # moving half is saturated red (as `expected`), still half is white; JPEG noise allowed
    assert np.abs(color[4:20, 2:12] - expected[4:20, 34:44]).max() <= 40
    assert color[4:20, 2:12, 1].mean() < 60 and color[4:20, 20:30].min() > 200
    assert np.abs(panel[:, 96:].astype(int) - q[..., 1:2]).max() <= 3


def test_viz_command_error_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["viz", str(tmp_path / "empty"), str(tmp_path / "o")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: no flow_x_*.jpg in {tmp_path / 'empty'}; extract with --modality flow or both"
    ]


def test_viz_reads_frame_roots_and_shards_through_the_reader(make_frame_folder, tmp_path):
    from flowprep.shards import pack

    make_frame_folder("c1/v_a", num_frames=4)
    frames, shards = tmp_path / "frames", tmp_path / "shards"
    pack(frames, shards)
    runner = CliRunner()
    runs = {
        "folder": [str(frames / "c1" / "v_a"), "-o", str(tmp_path / "folder")],
        "root": [str(frames), str(tmp_path / "root"), "--video", "c1/v_a"],
        "shards": [str(shards), "-o", str(tmp_path / "shards_png"), "--video", "c1/v_a", "-n", "2"],
    }
    panels = {}
    for name, args in runs.items():
        result = runner.invoke(main, ["viz", *args])
        assert result.exit_code == 0, result.output
        out = Path(args[args.index("-o") + 1] if "-o" in args else args[1])
        panels[name] = [cv2.imread(str(p)) for p in sorted(out.glob("viz_*.png"))]
    assert len(panels["folder"]) == len(panels["root"]) == 3 and len(panels["shards"]) == 2
    for a, b in zip(panels["root"], panels["shards"], strict=False):
        np.testing.assert_array_equal(a, b)  # the same JPEG bytes, the same decoder
    for a, b in zip(panels["folder"], panels["root"], strict=True):
        assert a.shape == b.shape == (24, 128, 3)
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2  # cv2.imread vs the reader


def test_viz_output_option_and_errors(make_frame_folder, tmp_path):
    folder = make_frame_folder("v", num_frames=3)
    runner = CliRunner()
    r = runner.invoke(main, ["viz", str(folder), str(tmp_path / "a"), "-o", str(tmp_path / "b")])
    assert r.exit_code == 2 and "give the output folder once: OUT or -o/--output" in r.output
    r = runner.invoke(main, ["viz", str(folder)])
    assert r.exit_code == 2 and "missing the output folder: give OUT or -o/--output" in r.output
    r = runner.invoke(main, ["viz", str(tmp_path / "frames"), "-o", str(tmp_path / "c"),
                             "--video", "nope"])  # fmt: skip
    assert r.exit_code == 1
    assert r.output == f"Error: {tmp_path / 'frames'}: no video 'nope'\n"
    r = runner.invoke(main, ["viz", str(folder), "-o", str(tmp_path / "d"), "-n", "1"])
    assert r.exit_code == 0 and r.output == f"wrote 1 panels to {tmp_path / 'd'}\n"
