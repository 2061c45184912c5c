"""strnet.data: flips, shared crops, flow/frame pairing, tau sampling, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from strnet.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MOTION_CROP_SCALES,
    ClipDataset,
    SamplingConfig,
    appearance_crop_box,
    clipped_stride_message,
    crop_resize,
    even_positions,
    flow_stack_indices,
    hflip_flow,
    hflip_normalized_flow,
    motion_crop_box,
    normalize_flow,
    pad_symmetric,
    position_frames,
    read_split_list,
    sample_chunk_positions,
    sample_chunks,
    stack_flows,
    stack_offset,
)


class FakeVideo:
    """In-memory video whose frame k has value k (+ a shared spatial pattern) everywhere."""

    def __init__(self, num_frames: int, height: int = 24, width: int = 32, seed: int = 0):
        rng = np.random.default_rng(seed)
        pattern = rng.integers(0, 60, size=(height, width), dtype=np.int64)
        k = np.arange(num_frames)[:, None, None]
        self.frames = np.repeat((pattern + k)[..., None], 3, axis=-1).astype(np.uint8)
        fx = pattern + k[:-1]
        fy = pattern + 100 + k[:-1]
        self.flows = np.stack([fx, fy], axis=-1).astype(np.uint8)
        self.num_frames, self.num_flows = num_frames, num_frames - 1
        self.label_index, self.meta = 0, {}
        self.reads: list[list[int]] = []

    def rgb(self, indices):
        self.reads.append(list(indices))
        return self.frames[list(indices)]

    def flow(self, indices):
        self.reads.append(list(indices))
        return self.flows[list(indices)]


class FakeReader(dict):
    @property
    def video_ids(self):
        return list(self)


def rgb_values(rgb: torch.Tensor) -> np.ndarray:
    """Undo ImageNet normalisation of (T, 3, H, W) back to uint8 values."""
    x = rgb.numpy().transpose(0, 2, 3, 1) * IMAGENET_STD + IMAGENET_MEAN
    return np.round(x * 255).astype(np.int64)


def test_hflip_flow_negates_x_exactly():
    rng = np.random.default_rng(0)
    q = rng.integers(0, 256, size=(3, 5, 7, 20), dtype=np.uint8)
    f = hflip_flow(q)
    np.testing.assert_array_equal(f[..., 0::2], 255 - q[..., ::-1, 0::2])
    np.testing.assert_array_equal(f[..., 1::2], q[..., ::-1, 1::2])
    np.testing.assert_array_equal(hflip_flow(f), q)
    # the test-time flip in normalized space matches the uint8 rule exactly
    torch.testing.assert_close(
        hflip_normalized_flow(normalize_flow(q)), normalize_flow(f), rtol=0, atol=0
    )


def test_stack_flows_interleaves_x_and_y():
    flows = np.zeros((3, 2, 2, 2), dtype=np.uint8)
    for k in range(3):
        flows[k, ..., 0], flows[k, ..., 1] = 10 + k, 20 + k
    assert stack_flows(flows)[0, 0].tolist() == [10, 20, 11, 21, 12, 22]


def test_same_crop_across_stack_and_chunks():
    video = FakeVideo(40)
    cfg = SamplingConfig(
        num_chunks=3, tau_min=2, tau_max=4, flow_stack=4, crop="motion", crop_size=16, flip_p=0.0
    )
    ds = ClipDataset(FakeReader(v=video), [("v", 0)] * 6, cfg, seed=1)
    crops = set()
    for i in range(6):
        item = ds[i]
        rgb = rgb_values(item["rgb"])[..., 0]  # (T, h, w)
        flow = item["flow"].numpy()  # (T, 2L, h, w)
        base = rgb[0]
        for t in range(3):  # every chunk and every flow channel: same window, shifted values
            diff = rgb[t] - base
            assert diff.max() - diff.min() <= 2
            for c in range(8):
                diff = flow[t, c] - base
                assert diff.max() - diff.min() <= 2
        crops.add((base - base.min()).tobytes())
    assert len(crops) > 1  # while different samples get different crops


def test_flip_in_dataset_mirrors_and_negates_x():
    video = FakeVideo(30)
    kw = dict(num_chunks=2, tau_min=3, tau_max=3, flow_stack=3, crop="none")
    plain = ClipDataset(FakeReader(v=video), [("v", 0)], SamplingConfig(**kw, flip_p=0.0))[0]
    flipped = ClipDataset(FakeReader(v=video), [("v", 0)], SamplingConfig(**kw, flip_p=1.0))[0]
    # same generator draws the same positions; the flip is exact
    torch.testing.assert_close(flipped["rgb"], torch.flip(plain["rgb"], dims=[-1]), rtol=0, atol=0)
    torch.testing.assert_close(
        flipped["flow"], hflip_normalized_flow(plain["flow"]), rtol=0, atol=0
    )
    x_plain, x_flip = plain["flow"][0, 0] + 128, flipped["flow"][0, 0] + 128
    torch.testing.assert_close(x_flip, 255 - torch.flip(x_plain, dims=[-1]), rtol=0, atol=0)


@pytest.mark.parametrize(("flow_offset", "first"), [("center", -5), (0, 0), (-2, -2)])
@pytest.mark.parametrize("train", [True, False])
def test_flow_index_k_pairs_with_frame_k(flow_offset, first, train):
    """Chunk at frame k: flows k-5 ... k+4 (centred, the default, as the authors'
    cnn_get_im_flow_batch.m: frameOffsets = -L/2 : L/2-1), or k+o ... k+o+9 for an integer o."""
    video = FakeVideo(60)
    cfg = SamplingConfig(
        num_chunks=5, tau_min=5, tau_max=15, flow_stack=10, crop="none", flip_p=0.0,
        flow_offset=flow_offset, test_chunks=7,
    )  # fmt: skip
    ds = ClipDataset(FakeReader(v=video), [("v", 3)] * 8, cfg, seed=0, train=train)
    for i in range(8):
        item = ds[i]
        chunks = 5 if train else 7
        assert item["label"] == 3
        assert item["rgb"].shape == (chunks, 3, 24, 32)
        assert item["flow"].shape == (chunks, 20, 24, 32)
        frame_k = rgb_values(item["rgb"])[:, 0, 0, 0] - video.frames[0, 0, 0, 0]
        flow = item["flow"].numpy()[:, :, 0, 0] + 128 - video.flows[0, 0, 0, 0]
        np.testing.assert_array_equal(flow[:, 0], frame_k + first)  # x of each stack's first flow
        for j in range(10):  # interleaved x_j, y_j of flows k+o .. k+o+9, all inside the video
            np.testing.assert_array_equal(flow[:, 2 * j], frame_k + first + j)
            np.testing.assert_array_equal(flow[:, 2 * j + 1], frame_k + first + j + 100)
        assert frame_k.min() + first >= 0 and frame_k.max() + first + 9 <= video.num_flows - 1
        strides = np.diff(frame_k)
        if train:
            assert len(set(strides.tolist())) == 1 and 5 <= strides[0] <= 15
        else:  # test chunks spread from the first to the last frame with a whole stack
            assert frame_k[0] == -first and frame_k[-1] + first + 9 == video.num_flows - 1


def test_centred_stacks_clamp_at_the_edges_of_short_videos():
    # 7 frames, 6 flows, L = 10: no frame has a whole centred stack; the middle one is used
    assert position_frames(7, 6, 10, True, -5) == (3, 1)
    np.testing.assert_array_equal(flow_stack_indices(3, 10, 6, -5), [0, 0, 0, 1, 2, 3, 4, 5, 5, 5])
    assert position_frames(7, 6, 10, True, 0) == (0, 1)  # from the frame on: frame 0 (as before)
    # 12 frames, 11 flows, L = 4, centred: frames 2 ... 9 (flows 0-3 ... 7-10)
    assert position_frames(12, 11, 4, True, -2) == (2, 8)
    assert position_frames(12, 11, 4, False, -2) == (0, 12)  # RGB only: every frame
    assert stack_offset("center", 10) == -5 and stack_offset("center", 5) == -2
    assert stack_offset(3, 10) == 3
    with pytest.raises(ValueError, match="flow_offset must be 'center' or an integer, got 'mid'"):
        ClipDataset(FakeReader(v=FakeVideo(5)), [("v", 0)], SamplingConfig(flow_offset="mid"))
    video = FakeVideo(7)
    cfg = SamplingConfig(num_chunks=3, flow_stack=10, crop="none", flip_p=0.0)
    item = ClipDataset(FakeReader(v=video), [("v", 0)], cfg)[0]
    frames = rgb_values(item["rgb"])[:, 0, 0, 0] - video.frames[0, 0, 0, 0]
    assert frames.tolist() == [3, 3, 3]
    x = item["flow"].numpy()[0, 0::2, 0, 0] + 128 - video.flows[0, 0, 0, 0]
    assert x.tolist() == [0, 0, 0, 1, 2, 3, 4, 5, 5, 5]


@pytest.mark.parametrize("num_chunks,tau", [(1, (1, 1)), (5, (5, 15)), (11, (1, 15))])
def test_tau_sampling_stays_inside_the_video(num_chunks, tau):
    rng = np.random.default_rng(0)
    for n in range(1, 120):
        for _ in range(5):
            pos = sample_chunk_positions(n, num_chunks, tau, rng)
            assert len(pos) == num_chunks
            assert pos.min() >= 0 and pos.max() <= n - 1
            steps = np.diff(pos)
            if n >= num_chunks:  # enough positions: one constant stride within the range
                assert len(set(steps.tolist())) <= 1
                assert num_chunks == 1 or 1 <= steps[0] <= tau[1]
                if num_chunks > 1 and n - 1 >= (num_chunks - 1) * tau[0]:
                    assert tau[0] <= steps[0]  # tau is only reduced when the video is short


def test_short_videos_pad_symmetrically_and_clip_stacks():
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(sample_chunk_positions(3, 5, (5, 15), rng), [0, 0, 1, 2, 2])
    np.testing.assert_array_equal(pad_symmetric(np.arange(2), 5), [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(flow_stack_indices(2, 4, 4), [2, 3, 3, 3])
    # a 4-frame video (3 flows) still yields full stacks, last flow repeated
    video = FakeVideo(4)
    cfg = SamplingConfig(
        num_chunks=5, tau_min=5, tau_max=15, flow_stack=10, crop="none", flip_p=0.0
    )
    item = ClipDataset(FakeReader(v=video), [("v", 0)], cfg)[0]
    assert item["flow"].shape == (5, 20, 24, 32)
    assert all(r == sorted(set(r)) for r in video.reads)  # reader sees increasing unique indices


def test_even_positions_cover_the_video():
    pos = even_positions(100, 25)
    assert len(pos) == 25 and pos[0] == 0 and pos[-1] == 99 and np.all(np.diff(pos) > 0)
    assert even_positions(1, 25).tolist() == [0] * 25


def test_motion_crop_sizes_and_corners():
    rng = np.random.default_rng(0)
    sizes = {round(256 * s) for s in MOTION_CROP_SCALES}
    assert sizes == {256, 224, 192, 168}
    corners = set()
    for _ in range(300):
        b = motion_crop_box(256, 340, rng)
        assert b.h in sizes and b.w in sizes
        assert b.y in (0, 256 - b.h, (256 - b.h) // 2) and b.x in (0, 340 - b.w, (340 - b.w) // 2)
        corners.add((b.y == 0, b.x == 0, b.y + b.h == 256, b.x + b.w == 340))
    assert len(corners) >= 5


def test_appearance_crop_jitter_and_border():
    rng = np.random.default_rng(0)
    for _ in range(300):
        b = appearance_crop_box(256, 340, rng)
        assert 168 <= b.h <= 256 and 168 <= b.w <= 280
        assert min(b.y, 256 - b.y - b.h) <= 64 and min(b.x, 340 - b.x - b.w) <= 85
        assert b.y >= 0 and b.x >= 0 and b.y + b.h <= 256 and b.x + b.w <= 340
    out = crop_resize(np.zeros((2, 256, 340, 20), np.uint8), b, 32)
    assert out.shape == (2, 32, 32, 20)


def test_samples_are_deterministic_per_seed_epoch_index():
    video = FakeVideo(50)
    cfg = SamplingConfig(
        num_chunks=3, tau_min=1, tau_max=15, flow_stack=4, crop="appearance", crop_size=16
    )
    ds = ClipDataset(FakeReader(v=video), [("v", 0)] * 4, cfg, seed=7)
    a = ds[2]
    torch.testing.assert_close(ds[2]["flow"], a["flow"], rtol=0, atol=0)
    ds.set_epoch(1)
    assert not torch.equal(ds[2]["flow"], a["flow"]) or not torch.equal(ds[2]["rgb"], a["rgb"])


def test_missing_video_is_one_line_error(tmp_path):
    with pytest.raises(KeyError) as exc:
        ClipDataset(FakeReader(v=FakeVideo(5)), [("v", 0), ("gone/v_x", 1)], SamplingConfig())
    assert exc.value.args[0] == "video 'gone/v_x' of the list is not in the data"
    bad = tmp_path / "train_split1.txt"
    bad.write_text("a 10 0\nb 10\n")
    with pytest.raises(ValueError, match="train_split1.txt:2: expected"):
        read_split_list(bad)


def test_epoch_travels_with_the_index_and_short_videos_are_flagged():
    video = FakeVideo(12)  # 11 flows, stacks of 4: 8 positions
    cfg = SamplingConfig(
        num_chunks=3, tau_min=2, tau_max=6, flow_stack=4, crop="appearance", crop_size=16
    )
    ds = ClipDataset(FakeReader(v=video), [("v", 0)] * 4, cfg, seed=7)
    ds.set_epoch(3)
    a = ds[2]
    ds.set_epoch(0)
    b = ds[(3, 2)]  # what a persistent worker, whose copy stays at epoch 0, is asked for
    torch.testing.assert_close(a["flow"], b["flow"], rtol=0, atol=0)
    assert b["index"] == 2 and b["num_positions"] == 8
    # tau up to 6 needs 1 + 2 * 6 = 13 positions: flagged exactly when the drawn tau is cut
    for seed in range(20):
        want = sample_chunk_positions(8, 3, (2, 6), np.random.default_rng(seed))
        got, clipped = sample_chunks(8, 3, (2, 6), np.random.default_rng(seed))
        np.testing.assert_array_equal(got, want)
        drawn = int(np.random.default_rng(seed).integers(2, 7))
        assert clipped == (drawn > 3)
    batch = {"tau_clipped": torch.tensor([False, True]), "index": torch.tensor([0, 1]),
             "num_positions": torch.tensor([8, 8])}  # fmt: skip
    assert clipped_stride_message(batch, [("v", 0), ("short/v", 1)], cfg) == (
        "video 'short/v' has 8 chunk positions, too few for 3 chunks at stride tau 2-6: "
        "tau reduced or positions padded for such videos (warned once per run)"
    )
    assert clipped_stride_message({**batch, "tau_clipped": torch.tensor([0, 0])}, [], cfg) is None


def test_flow_offset_config_key_reaches_the_dataset():
    from strnet.config import ConfigError, load_config
    from strnet.runtime import sampling_config

    assert sampling_config(load_config("motion")).flow_offset == "center"
    assert sampling_config(load_config("motion", ["data.flow_offset=0"])).flow_offset == 0
    assert sampling_config(load_config("motion", ["data.flow_offset=-3"])).flow_offset == -3
    with pytest.raises(ConfigError, match="^data.flow_offset must be 'center' or an integer"):
        load_config("motion", ["data.flow_offset=middle"])
