"""strnet models: torchvision keys, Table 1 shapes, eq. 2/4/5, sub-batch BN, fully conv tests."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from strnet.layers import MotionResidual, SubBatchNorm2d
from strnet.models import MODEL_NAMES, create_model, is_two_stream
from strnet.resnet import resnet
from strnet.st_resnet import fuse
from strnet.summary import stage_shapes, summary_command
from strnet.weights import WeightsError, adapt_input_conv, load_pretrained


def torchvision_resnet50_state(num_classes: int = 1000, seed: int = 0) -> dict:
    """Random tensors under torchvision's ResNet-50 keys and shapes, written out by hand."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def conv(key, cout, cin, k):
        state[key] = torch.randn(cout, cin, k, k, generator=g) * 0.05

    def bn(key, c):
        state[f"{key}.weight"] = 1 + 0.1 * torch.randn(c, generator=g)
        state[f"{key}.bias"] = 0.1 * torch.randn(c, generator=g)
        state[f"{key}.running_mean"] = 0.1 * torch.randn(c, generator=g)
        state[f"{key}.running_var"] = 1 + torch.rand(c, generator=g)
        state[f"{key}.num_batches_tracked"] = torch.tensor(100)

    conv("conv1.weight", 64, 3, 7)
    bn("bn1", 64)
    cin = 64
    for layer, (planes, units) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True), 1):
        for u in range(units):
            p = f"layer{layer}.{u}"
            conv(f"{p}.conv1.weight", planes, cin, 1)
            bn(f"{p}.bn1", planes)
            conv(f"{p}.conv2.weight", planes, planes, 3)
            bn(f"{p}.bn2", planes)
            conv(f"{p}.conv3.weight", planes * 4, planes, 1)
            bn(f"{p}.bn3", planes * 4)
            if u == 0:
                conv(f"{p}.downsample.0.weight", planes * 4, cin, 1)
                bn(f"{p}.downsample.1", planes * 4)
            cin = planes * 4
    state["fc.weight"] = torch.randn(num_classes, 2048, generator=g) * 0.01
    state["fc.bias"] = torch.zeros(num_classes)
    return state


# --------------------------------------------------------------------------- 2D ResNet
@pytest.mark.parametrize(
    ("depth", "count"),
    [(18, 11_689_512), (34, 21_797_672), (50, 25_557_032), (101, 44_549_160)],
)
def test_parameter_counts_match_torchvision(depth, count):
    net = resnet(depth, num_classes=1000)
    assert sum(p.numel() for p in net.parameters()) == count


def test_torchvision_checkpoint_loads_with_no_missing_keys(tmp_path):
    state = torchvision_resnet50_state()
    path = tmp_path / "resnet50-imagenet.pth"
    torch.save(state, path)
    net = create_model("resnet50", num_classes=1000)
    report = load_pretrained(net, path, new_head=False)
    assert report.missing == [] and report.unexpected == [] and report.adapted == []
    assert sorted(report.loaded) == sorted(state) == sorted(net.state_dict())
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())


def test_wrong_or_partial_checkpoint_names_missing_and_unexpected_keys(tmp_path):
    state = torchvision_resnet50_state()
    del state["layer4.2.bn3.weight"]
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pth"
    torch.save({"state_dict": state}, path)
    net = create_model("resnet50", num_classes=1000)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(WeightsError) as err:
        load_pretrained(net, path)
    assert str(err.value) == (
        f"'{path}' does not fit ResNet: 1 missing (layer4.2.bn3.weight); "
        "1 unexpected (layer5.0.conv1.weight)"
    )
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # nothing loaded
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"^cannot read checkpoint '.*junk.pth': "):
        load_pretrained(net, tmp_path / "junk.pth")
    with pytest.raises(WeightsError, match="^checkpoint '/no/such.pth' not found$"):
        load_pretrained(net, "/no/such.pth")


def test_new_dataset_head_is_left_at_its_initialisation(tmp_path):
    torch.save(torchvision_resnet50_state(), tmp_path / "in.pth")
    net = create_model("resnet50", num_classes=101)
    fc = net.fc.weight.clone()
    report = load_pretrained(net, tmp_path / "in.pth")
    assert report.missing == ["fc.weight", "fc.bias"] and torch.equal(net.fc.weight, fc)
    with pytest.raises(WeightsError, match=r"2 missing \(fc.weight, fc.bias\); 2 mismatched"):
        load_pretrained(net, tmp_path / "in.pth", new_head=False)


# --------------------------------------------------------------------------- conv1 for flow
def test_conv1_rules_authors_and_timm():
    w = torch.randn(64, 3, 7, 7)
    authors = adapt_input_conv(w, 20, "authors")
    timm = adapt_input_conv(w, 20, "timm")
    assert authors.shape == timm.shape == (64, 20, 7, 7)
    for c in range(20):
        torch.testing.assert_close(authors[:, c], w.mean(1))  # mean of R, G, B, not rescaled
        torch.testing.assert_close(timm[:, c], w[:, c % 3] * 3 / 20)  # R, G, B cycled, 3/N


@pytest.mark.parametrize("rule", ["authors", "timm"])
def test_motion_stream_conv1_initialised_from_rgb_filters(rule):
    state = torchvision_resnet50_state()
    net = create_model("two_stream_resnet50", num_classes=101, flow_stack=10)
    load_pretrained(net.appearance, state)
    report = load_pretrained(net.motion, state, conv1_init=rule)
    assert report.adapted == ["conv1.weight"]
    assert net.motion.conv1.weight.shape == (64, 20, 7, 7)
    torch.testing.assert_close(
        net.motion.conv1.weight, adapt_input_conv(state["conv1.weight"], 20, rule)
    )
    torch.testing.assert_close(net.appearance.conv1.weight, state["conv1.weight"])


# --------------------------------------------------------------------------- Table 1
def test_table1_shapes_for_11_chunks_at_224():
    torch.manual_seed(0)
    net = create_model("st_resnet50_star", num_classes=5, width=8).eval()
    rows = stage_shapes(net.motion, "motion", torch.zeros(1, 11, 20, 224, 224))
    size = {r.stage: (r.width, r.height, r.chunks, r.channels) for r in rows}
    assert size["conv1"] == (112, 112, 11, 8)
    assert size["pool1"] == (56, 56, 11, 8)
    assert size["conv2_x"] == (56, 56, 11, 32)
    assert size["conv5_x"] == (7, 7, 11, 256)  # 2048 at width 64
    assert size["pool5"] == (1, 1, 4, 256)  # 7x7 average, then max over 5 chunks, stride 2
    with torch.no_grad():
        scores = net(torch.randn(1, 11, 3, 224, 224), torch.randn(1, 11, 20, 224, 224))
    assert scores["appearance"].shape == scores["motion"].shape == (1, 4, 5)


def test_temporal_convs_sit_in_the_second_unit_of_each_stage():
    net = create_model("st_resnet50", num_classes=5, width=8)
    five_d = sorted(k for k, v in net.state_dict().items() if v.ndim == 5)
    expected = sorted(
        f"{s}.layer{i}.1.conv{c}.weight"
        for s in ("appearance", "motion")
        for i in (1, 2, 3, 4)
        for c in (1, 3)
    )
    assert five_d == expected and len(five_d) == 16
    assert all(net.state_dict()[k].shape[2:] == (3, 1, 1) for k in five_d)


def test_st_resnet_star_pools_25_test_chunks_to_11_positions():
    net = create_model("st_resnet50_star", num_classes=3, width=4).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 25, 3, 32, 32), torch.randn(1, 25, 20, 32, 32))
    assert out["appearance"].shape == (1, 11, 3)  # (25 - 5) / 2 + 1


# --------------------------------------------------------------------------- eq. 5
def test_inflated_network_equals_2d_network_on_a_clip_constant_over_time():
    """Eq. 5 plus replicate padding in time: every chunk, ends included, sees w/3 three times."""
    torch.manual_seed(0)
    flat = resnet(50, num_classes=7, width=8).eval()
    with torch.no_grad():  # non-trivial BN statistics
        for m in flat.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    st = resnet(50, num_classes=7, width=8, temporal=True).eval()
    report = load_pretrained(st, flat.state_dict(), new_head=False)
    assert len(report.adapted) == 8  # the 1x1 convs of conv2_2 ... conv5_2
    frame = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        expect = flat(frame)
        got = st(frame[:, None].expand(-1, 5, -1, -1, -1).contiguous())
    assert got.shape == (2, 5, 7)
    for t in range(5):
        torch.testing.assert_close(got[:, t], expect, rtol=1e-4, atol=1e-5)
    # a clip that changes over time is mixed across chunks: the temporal convs are live
    with torch.no_grad():
        clip = torch.randn(2, 5, 3, 64, 80)
        mixed, alone = st(clip)[:, 2], flat(clip[:, 2])
    assert (mixed - alone).abs().max() > 1e-3


def test_temporal_conv_mixes_neighbouring_chunks_only():
    st = resnet(50, num_classes=4, width=8, temporal=True).eval()
    conv = st.layer1[1].conv1
    x = torch.zeros(1 * 5, conv.in_channels, 2, 2)
    x[2] = torch.randn(conv.in_channels, 2, 2)  # an impulse at chunk 2
    with torch.no_grad():
        y = conv(x, 5)
    energy = y.abs().flatten(1).sum(1)
    assert (energy[[1, 2, 3]] > 0).all() and (energy[[0, 4]] == 0).all()


# --------------------------------------------------------------------------- eq. 2 and eq. 4
def motion_grads_from_appearance_loss(name: str) -> dict[str, torch.Tensor | None]:
    torch.manual_seed(0)
    net = create_model(name, num_classes=4, width=4, flow_stack=2)
    out = net(torch.randn(2, 3, 3, 64, 64), torch.randn(2, 3, 4, 64, 64))
    F.cross_entropy(out["appearance"].flatten(0, 1), torch.tensor([0, 1, 2, 3, 0, 1])).backward()
    return {k: p.grad for k, p in net.motion.named_parameters()}


@pytest.mark.parametrize("name", ["st_resnet50", "stm_resnet50"])
def test_appearance_loss_reaches_motion_stream_below_the_last_connection(name):
    grads = motion_grads_from_appearance_loss(name)
    # the last connection feeds the motion input of layer4.1 (= output of layer4.0) across
    below = [k for k in grads if not k.startswith(("layer4.1.", "layer4.2.", "fc."))]
    above = [k for k in grads if k.startswith(("layer4.1.", "layer4.2.", "fc."))]
    assert below and above
    weights = [k for k in below if k.endswith("weight") and "bn" not in k]
    assert all(grads[k] is not None and grads[k].abs().sum() > 0 for k in weights)
    assert all(grads[k] is None or grads[k].abs().sum() == 0 for k in above)


def test_two_stream_baseline_keeps_streams_apart():
    grads = motion_grads_from_appearance_loss("two_stream_resnet50")
    assert all(g is None for g in grads.values())


def test_motion_loss_never_reaches_the_appearance_stream():
    torch.manual_seed(0)
    net = create_model("st_resnet50", num_classes=3, width=4, flow_stack=2)
    out = net(torch.randn(2, 2, 3, 32, 32), torch.randn(2, 2, 4, 32, 32))
    out["motion"].sum().backward()
    assert all(p.grad is None for p in net.appearance.parameters())


def test_motion_residual_interactions():
    x_a, x_m = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(MotionResidual("additive")(x_a, x_m), x_a + x_m.clamp(min=0))
    torch.testing.assert_close(MotionResidual("multiplicative")(x_a, x_m), x_a * x_m.clamp(min=0))
    with pytest.raises(ValueError, match="interaction"):
        MotionResidual("concat")


def test_motion_residual_feeds_the_branch_but_not_the_identity_path():
    """Eq. 2 by hand on one unit: out = ReLU(x_a + F(x_a + ReLU(x_m)))."""
    torch.manual_seed(0)
    net = create_model("st_resnet50", num_classes=3, width=4, flow_stack=1).eval()
    unit = net.appearance.layer2[1]
    x_a, x_m = torch.randn(3, 32, 8, 8), torch.randn(3, 32, 8, 8)
    with torch.no_grad():
        got = unit(x_a, 3, net.residuals[1](x_a, x_m))
        h = x_a + x_m.clamp(min=0)
        branch = F.relu(unit.bn1(unit.conv1(h, 3)))
        branch = F.relu(unit.bn2(unit.conv2(branch)))
        branch = unit.bn3(unit.conv3(branch, 3))
    torch.testing.assert_close(got, F.relu(x_a + branch))


# --------------------------------------------------------------------------- sub-batch BN
def test_sub_batch_bn_with_k_equal_to_batch_is_ordinary_bn():
    torch.manual_seed(0)
    x = torch.randn(8, 5, 4, 4) * 3 + 1
    sub, ref = SubBatchNorm2d(5, sub_batch=8), torch.nn.BatchNorm2d(5)
    with torch.no_grad():
        sub.weight.uniform_(0.5, 2)
        sub.bias.uniform_(-1, 1)
    ref.load_state_dict(sub.state_dict())
    for _ in range(3):
        torch.testing.assert_close(sub(x), ref(x))
    torch.testing.assert_close(sub.running_mean, ref.running_mean)
    torch.testing.assert_close(sub.running_var, ref.running_var)
    assert sub.num_batches_tracked == ref.num_batches_tracked == 3


def test_sub_batch_bn_normalises_each_group_of_clips_alone():
    torch.manual_seed(0)
    x = torch.randn(12, 3, 4, 4)
    x[6:] = x[6:] * 5 + 10  # the two groups differ a lot
    sub = SubBatchNorm2d(3, sub_batch=2)
    sub.chunks = 3  # 2 clips x 3 chunks per group: rows 0-5 and 6-11
    y = sub(x)
    for rows in (slice(0, 6), slice(6, 12)):  # each group exactly as BN on that group alone
        torch.testing.assert_close(y[rows], F.batch_norm(x[rows], None, None, training=True))
    group_means = torch.stack([x[:6].mean((0, 2, 3)), x[6:].mean((0, 2, 3))])
    torch.testing.assert_close(sub.running_mean, 0.1 * group_means.mean(0))
    sub.eval()  # inference uses the running statistics, not groups
    torch.testing.assert_close(
        sub(x), F.batch_norm(x, sub.running_mean, sub.running_var, sub.weight, sub.bias)
    )


def test_sub_batch_bn_keeps_batchnorm_state_dict_keys():
    net = create_model("resnet50", num_classes=10, bn_sub_batch=4)
    ref = resnet(50, num_classes=10)
    assert list(net.state_dict()) == list(ref.state_dict())
    assert all(m.sub_batch == 4 for m in net.modules() if isinstance(m, SubBatchNorm2d))


# --------------------------------------------------------------------------- Sec. 3.4 inference
def test_fully_convolutional_inference_averages_the_classifier_over_locations():
    torch.manual_seed(0)
    net = resnet(50, num_classes=6, width=8).eval()
    frame = torch.randn(1, 3, 256, 341)
    with torch.no_grad():
        got = net(frame)
        h = net.stem(frame)
        for stage in net.stages:
            h = stage(h)
        assert h.shape[-2:] == (8, 11)
        scores = [
            net.fc(h[0, :, y : y + 7, x : x + 7].mean((1, 2)))  # classifier at each location
            for y in range(8 - 7 + 1)
            for x in range(11 - 7 + 1)
        ]
    assert len(scores) == 10  # 2 x 5 positions of the 7x7 pool5 window
    torch.testing.assert_close(got[0], torch.stack(scores).mean(0), rtol=1e-4, atol=1e-5)


def test_two_stream_on_whole_frames_and_late_fusion():
    torch.manual_seed(0)
    net = create_model("st_resnet50", num_classes=4, width=4, flow_stack=2).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, 3, 64, 86), torch.randn(2, 3, 4, 64, 86))
    assert out["appearance"].shape == out["motion"].shape == (2, 3, 4)
    torch.testing.assert_close(fuse(out), (out["appearance"] + out["motion"]) / 2)
    with pytest.raises(ValueError, match="need the same B, T, H, W"):
        net(torch.randn(2, 3, 3, 64, 86), torch.randn(2, 2, 4, 64, 86))


# --------------------------------------------------------------------------- registry, CLI
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_registered_model_builds_and_runs(name):
    torch.manual_seed(0)
    if is_two_stream(name):
        net = create_model(name, num_classes=3, width=2, flow_stack=2).eval()
        with torch.no_grad():
            out = net(torch.randn(1, 2, 3, 32, 32), torch.randn(1, 2, 4, 32, 32))
        assert set(out) == {"appearance", "motion"}
        assert all(v.shape == (1, 1 if name.endswith("_star") else 2, 3) for v in out.values())
    else:
        net = create_model(name, num_classes=3, width=2, in_channels=4).eval()
        with torch.no_grad():
            assert net(torch.randn(2, 4, 32, 32)).shape == (2, 3)
            assert net(torch.randn(2, 5, 4, 32, 32)).shape == (2, 5, 3)


def test_st_resnet_needs_a_bottleneck_resnet():
    with pytest.raises(ValueError, match="bottleneck"):
        resnet(18, temporal=True)
    with pytest.raises(ValueError, match="unknown model 'st_resnet18'"):
        create_model("st_resnet18")


def test_summary_command_prints_table1_sizes():
    r = CliRunner().invoke(summary_command, ["st_resnet50_star", "--base-width", "8"])
    assert r.exit_code == 0, r.output
    assert "appearance  conv5_x  7 x 7 x 11, 256" in r.output
    assert "motion      pool5    1 x 1 x 4, 256" in r.output
    r = CliRunner().invoke(summary_command, ["resnet50", "--chunks", "1", "--num-classes", "1000"])
    assert "parameters: 25,557,032" in r.output
    assert "multiply-adds per clip: 4.09 G" in r.output
