"""strnet models: torchvision keys, Table 1 shapes, eq. 2/4/5, sub-batch BN, fully conv tests."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from strnet.cli import summary_command
from strnet.layers import MotionResidual, SubBatchNorm2d
from strnet.models import MODEL_NAMES, create_model, is_3d, is_two_stream
from strnet.resnet import resnet
from strnet.st_resnet import fuse
from strnet.summary import stage_shapes
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
    assert size["pool5"] == (1, 1, 4, 256)  # max over 5 chunks, stride 2, then 7x7 average
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
    x = torch.zeros(1, 5, conv.in_channels, 2, 2)  # one clip of 5 chunks
    x[0, 2] = torch.randn(conv.in_channels, 2, 2)  # an impulse at chunk 2
    with torch.no_grad():
        y = conv(x)[0]
    energy = y.abs().flatten(1).sum(1)
    assert (energy[[1, 2, 3]] > 0).all() and (energy[[0, 4]] == 0).all()


# --------------------------------------------------------------------------- eq. 2 and eq. 4
def motion_grads_from_appearance_loss(name: str) -> dict[str, torch.Tensor | None]:
    torch.manual_seed(0)
    net = create_model(name, num_classes=4, width=4, flow_stack=2)
    out = net(torch.randn(2, 3, 3, 64, 64), torch.randn(2, 3, 4, 64, 64))
    scores = out["appearance"].flatten(0, 1)  # 6 positions; 2 for STM (max over the 3 chunks)
    F.cross_entropy(scores, torch.tensor([0, 1, 2, 3, 0, 1])[: len(scores)]).backward()
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
    """Eq. 2 by hand on one unit (post_relu): out = ReLU(x_a + F(x_a + ReLU(x_m)))."""
    torch.manual_seed(0)
    net = create_model(
        "st_resnet50", num_classes=3, width=4, flow_stack=1, residual_input="post_relu"
    ).eval()
    unit = net.appearance.layer2[1]
    x_a, x_m = torch.randn(1, 3, 32, 8, 8), torch.randn(1, 3, 32, 8, 8)  # one clip of 3 chunks
    with torch.no_grad():
        got = unit(x_a, x_m)
        h = x_a + x_m.clamp(min=0)
        branch = F.relu(unit.bn1(unit.conv1(h)))
        branch = F.relu(unit.bn2(unit.conv2(branch)))
        branch = unit.bn3(unit.conv3(branch))
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
    # 4 clips x 3 chunks, 2 clips per group: rows 0-5 and 6-11 of the flattened batch
    y = sub(x.view(4, 3, 3, 4, 4)).reshape(12, 3, 4, 4)
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
        pooled = name.endswith("_star") or name.startswith("stm_")  # max over time: 2 chunks -> 1
        assert all(v.shape == (1, 1 if pooled else 2, 3) for v in out.values())
    elif is_3d(name):  # 3D ResNets: clips (B, C, T, H, W) -> (B, K)
        net = create_model(name, num_classes=3, width=2, in_channels=4).eval()
        with torch.no_grad():
            assert net(torch.randn(2, 4, 16, 32, 32)).shape == (2, 3)
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


# --------------------------------------------------------------------------- issue 14
def eval_bn(module, h):
    """BatchNorm in inference by the functional op alone (no module forward)."""
    return F.batch_norm(
        h, module.running_mean, module.running_var, module.weight, module.bias, False, 0.0,
        module.eps,
    )  # fmt: skip


def reference_bottleneck_sum(unit, x, branch_in):
    """A 2D bottleneck unit by hand on frames (N, C, H, W): its sum before the last ReLU."""
    h = F.relu(eval_bn(unit.bn1, F.conv2d(branch_in, unit.conv1.weight, stride=unit.conv1.stride)))
    h = F.conv2d(h, unit.conv2.weight, stride=unit.conv2.stride, padding=1)
    h = eval_bn(unit.bn3, F.conv2d(F.relu(eval_bn(unit.bn2, h)), unit.conv3.weight))
    if unit.downsample is not None:
        conv, bn = unit.downsample
        x = eval_bn(bn, F.conv2d(x, conv.weight, stride=conv.stride))
    return h + x


def randomise_bn(net):
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)


@pytest.mark.parametrize("residual_input", ["pre_relu", "post_relu"])
def test_eq2_branch_input_on_a_two_unit_toy(residual_input):
    """Two units of conv3_x by hand: unit 0's sum s, then unit 1's branch gets s + ReLU(x_m)
    (pre_relu: eq. 2 read literally, STResNet_stage1.m sums `res3a`) or ReLU(s) + ReLU(x_m)."""
    from strnet.resnet import Stage

    torch.manual_seed(0)
    net = resnet(50, num_classes=3, width=4, links="additive", residual_input=residual_input)
    randomise_bn(net.eval())
    toy = Stage(*list(net.layer2)[:2])
    x = torch.randn(2, 16, 8, 8)  # layer2's input: 2 frames (one-chunk clips)
    x_m = torch.randn(2, 32, 4, 4)  # the motion stream's input to unit 1
    with torch.no_grad():
        got = toy(x, motion=x_m)
        s = reference_bottleneck_sum(toy[0], x, x)
        x_a = s if residual_input == "pre_relu" else F.relu(s)
        out = F.relu(reference_bottleneck_sum(toy[1], F.relu(s), x_a + F.relu(x_m)))
    torch.testing.assert_close(got, out)
    # the two readings differ wherever s < 0, which random weights give plenty of
    with torch.no_grad():
        x_other = F.relu(s) if residual_input == "pre_relu" else s
        other = F.relu(reference_bottleneck_sum(toy[1], F.relu(s), x_other + F.relu(x_m)))
    assert (other - out).abs().max() > 1e-3


def test_pre_relu_is_the_default_and_post_relu_a_named_option():
    net = create_model("st_resnet50", num_classes=3, width=2, flow_stack=1)
    assert [link.residual_input for link in net.links] == ["pre_relu"] * 4
    assert [link.interaction for link in net.links] == ["additive"] * 4
    old = create_model("st_resnet50", num_classes=3, width=2, flow_stack=1,
                       residual_input="post_relu")  # fmt: skip
    assert [link.residual_input for link in old.links] == ["post_relu"] * 4
    assert create_model("two_stream_resnet50", num_classes=3, width=2).links == []


def test_star_pools_time_with_max_on_the_conv5_map_then_averages_7x7():
    """A crafted conv5 map where the two orders differ: chunk t lights location (t, t)."""
    torch.manual_seed(0)
    net = create_model("st_resnet50_star", num_classes=4, width=2, flow_stack=1).eval()
    stream = net.appearance
    c = stream.fc.in_features
    crafted = torch.zeros(1, 5, c, 7, 7)
    for t in range(5):
        crafted[0, t, 0, t, t] = 1.0
    crafted[0, :, 1:] = torch.rand(5, c - 1, 7, 7)
    stream.layer4.register_forward_hook(lambda module, args, out: crafted)
    pooled = []
    stream.avgpool.register_forward_hook(lambda module, args, out: pooled.append(out))
    with torch.no_grad():
        scores = stream(torch.randn(1, 5, 3, 32, 32))
    max_then_avg = crafted.amax(1).mean((-2, -1))  # (1, C)
    avg_then_max = crafted.mean((-2, -1)).amax(1)
    assert max_then_avg[0, 0] == pytest.approx(5 / 49)
    assert avg_then_max[0, 0] == pytest.approx(1 / 49)
    assert pooled[0].shape == (1, 1, c, 1, 1)
    torch.testing.assert_close(pooled[0][:, 0, :, 0, 0], max_then_avg)
    torch.testing.assert_close(scores, stream.fc(max_then_avg)[:, None])


def test_star_refuses_a_chunk_count_that_drops_the_last_chunk():
    net = create_model("st_resnet50_star", num_classes=2, width=2, flow_stack=1).eval()
    with torch.no_grad():  # 11 and 25 chunks: every chunk pooled; 4 or fewer: one window of all
        for t, positions in ((11, 4), (7, 2), (3, 1), (4, 1)):
            out = net.appearance(torch.randn(1, t, 3, 32, 32))
            assert out.shape == (1, positions, 2)
        refused = r"stride 2 leave the last chunk of 12 out; use 11 or 13"
        with pytest.raises(ValueError, match=refused):
            net(torch.randn(1, 12, 3, 32, 32), torch.randn(1, 12, 2, 32, 32))


def test_stm_structure_and_parameter_count():
    """STMulNet.m: 1x1 convs stay 2D; a new 1x1x3 C->C conv with bias after the 3x3 conv of
    each stage's second unit, both streams; ResNet-50 streams at 101 classes, L = 10."""
    net = create_model("stm_resnet50")
    state = net.state_dict()
    five_d = sorted(k for k, v in state.items() if v.ndim == 5)
    assert five_d == sorted(
        f"{s}.layer{i}.1.temporal.weight" for s in ("appearance", "motion") for i in (1, 2, 3, 4)
    )
    for i, c in zip((1, 2, 3, 4), (64, 128, 256, 512), strict=True):
        assert state[f"motion.layer{i}.1.temporal.weight"].shape == (c, c, 3, 1, 1)
        assert state[f"motion.layer{i}.1.temporal.bias"].shape == (c,)
    # derived independently: two 2D ResNet-50s (conv1 of 2L = 20 channels for motion), plus
    # 3 C^2 + C per inserted conv, C = 64, 128, 256, 512
    resnet50_101 = 25_557_032 - 2048 * 1000 - 1000 + 2048 * 101 + 101
    motion_conv1 = 64 * (20 - 3) * 7 * 7
    inserted = sum(3 * c * c + c for c in (64, 128, 256, 512))
    expected = 2 * resnet50_101 + motion_conv1 + 2 * inserted
    assert expected == 49_574_154
    assert sum(p.numel() for p in net.parameters()) == expected
    r = CliRunner().invoke(summary_command, ["stm_resnet50", "--chunks", "5", "--height", "32",
                                             "--width", "32"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "parameters: 49,574,154" in r.output
    assert "appearance  pool5    1 x 1 x 1, 2048" in r.output  # 5 chunks -> 1 (stride 1)


def two_d_conv5(net, clip):
    """conv5 maps of a 2D ResNet for each chunk of (B, T, C, H, W), one frame at a time."""
    maps = []
    for t in range(clip.shape[1]):
        h = net.stem(clip[:, t])
        for stage in net.stages:
            h = stage(h)
        maps.append(h)
    return torch.stack(maps, 1)


def test_stm_with_gate_one_equals_its_2d_streams_then_max_over_5_chunks():
    """Identity init: an STM-ResNet loaded from two 2D ResNets, its gates held at 1 (x_a * 1,
    post_relu), gives each stream's 2D conv5 maps max-pooled over 5 chunks (stride 1), then pool5
    and fc. With the default pre_relu, gate 1 hands a unit the previous unit's pre-ReLU sum."""
    torch.manual_seed(0)
    rgb_net = resnet(50, num_classes=5, width=4).eval()
    flow_net = resnet(50, num_classes=5, width=4, in_channels=4).eval()
    randomise_bn(rgb_net)
    randomise_bn(flow_net)
    stm = create_model("stm_resnet50", num_classes=5, width=4, flow_stack=2,
                       residual_input="post_relu").eval()  # fmt: skip
    report = load_pretrained(stm.appearance, rgb_net.state_dict(), new_head=False)
    assert sorted(report.missing) == sorted(stm.appearance.fresh_keys())  # kept at identity
    load_pretrained(stm.motion, flow_net.state_dict(), new_head=False)
    for link in stm.links:
        assert link.interaction == "multiplicative"
        link.register_forward_hook(lambda module, args, out: args[0])  # the gate is constant 1
    rgb, flow = torch.randn(2, 7, 3, 40, 40), torch.randn(2, 7, 4, 40, 40)
    with torch.no_grad():
        out = stm(rgb, flow)
        for key, net, clip in (("appearance", rgb_net, rgb), ("motion", flow_net, flow)):
            conv5 = two_d_conv5(net, clip)  # (2, 7, C, 2, 2)
            pooled = torch.stack([conv5[:, i : i + 5].amax(1) for i in range(3)], 1)
            expect = net.fc(F.avg_pool2d(pooled.flatten(0, 1), 2).flatten(1)).view(2, 3, 5)
            torch.testing.assert_close(out[key], expect, rtol=1e-4, atol=1e-5)


def test_stm_gate_is_multiplicative_on_the_pre_relu_sum():
    torch.manual_seed(0)
    stm = create_model("stm_resnet50", num_classes=3, width=4, flow_stack=1).eval()
    randomise_bn(stm)
    unit0, unit1 = stm.appearance.layer3[0], stm.appearance.layer3[1]
    x = torch.randn(1, 2, 32, 8, 8)
    x_m = torch.randn(1, 2, 64, 4, 4)
    seen = []
    unit1.conv1.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        taps: list = []
        y0 = unit0(x, taps=taps)  # unit 0 hands over its sum before the ReLU
        unit1(y0, x_m, x_pre=taps[0])
        stm.appearance.layer3(x, motion=x_m)  # the stage does the same by itself
    torch.testing.assert_close(F.relu(taps[0]), y0)
    for branch_input in seen:  # x_a (pre-ReLU) * ReLU(x_m) enters the first conv
        torch.testing.assert_close(branch_input, taps[0] * F.relu(x_m))


def test_temporal_conv_matches_conv3d_with_replicate_or_zero_padding():
    from strnet.layers import TemporalConv

    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 3, 4)  # (B, T, C, H, W)
    for padding, mode in (("replicate", "replicate"), ("zeros", "constant")):
        conv = TemporalConv(5, 7, bias=padding == "zeros", padding=padding)
        with torch.no_grad():
            conv.weight.normal_()
            if conv.bias is not None:
                conv.bias.normal_()
            got = conv(x)
            cthw = F.pad(x.transpose(1, 2), (0, 0, 0, 0, 1, 1), mode=mode)
            want = F.conv3d(cthw, conv.weight, conv.bias).transpose(1, 2)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_temporal_conv_keeps_only_its_input_for_backward():
    """No padded or 3x-channel copy of the activations is saved: every activation-sized tensor
    autograd keeps shares the input's storage."""
    from strnet.layers import TemporalConv

    conv = TemporalConv(16, 64)
    torch.nn.init.normal_(conv.weight)
    x = torch.randn(2, 5, 16, 14, 14, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = conv(x)
    big = [t for t in saved if t.numel() >= x.numel() // 2]
    where = x.untyped_storage().data_ptr()
    assert big and all(t.untyped_storage().data_ptr() == where for t in big)
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_hooks_fire_once_per_forward_on_every_stream_stage_and_unit():
    torch.manual_seed(0)
    net = create_model("st_resnet50", num_classes=3, width=2, flow_stack=1)
    calls: dict[str, int] = {}
    watched = {"appearance": net.appearance, "motion": net.motion}
    for s in ("appearance", "motion"):
        stream = getattr(net, s)
        for i, stage in enumerate(stream.stages, 1):
            watched[f"{s}.layer{i}"] = stage
            for u, unit in enumerate(stage):
                watched[f"{s}.layer{i}.{u}"] = unit
        for name in ("conv1", "maxpool", "avgpool", "fc"):
            watched[f"{s}.{name}"] = getattr(stream, name)
    for i, link in enumerate(net.links):
        watched[f"link{i}"] = link

    def counter(key):
        def hook(module, args, out):
            calls[key] = calls.get(key, 0) + 1

        return hook

    for key, module in watched.items():
        module.register_forward_hook(counter(key))
    out = net(torch.randn(2, 3, 3, 32, 32), torch.randn(2, 3, 2, 32, 32))
    assert calls == {key: 1 for key in watched}
    assert out["appearance"].shape == (2, 3, 3)
    # feature extraction with a hook on a stage: the (B, T, C, H, W) map
    feats = []
    net.appearance.layer3.register_forward_hook(lambda m, a, o: feats.append(o))
    net.appearance(torch.randn(2, 3, 3, 32, 32))
    assert feats[0].shape == (2, 3, 32, 2, 2)


def test_sub_batch_bn_is_one_batch_norm_call_and_handles_a_smaller_last_group(monkeypatch):
    import strnet.layers as layers

    torch.manual_seed(0)
    x = torch.randn(5, 3, 4, 2, 2) * torch.arange(1, 6).view(5, 1, 1, 1, 1)  # 5 clips, T = 3
    sub = SubBatchNorm2d(4, sub_batch=2)
    with torch.no_grad():
        sub.weight.uniform_(0.5, 2)
        sub.bias.uniform_(-1, 1)
    real, count = F.batch_norm, []
    monkeypatch.setattr(layers.F, "batch_norm", lambda *a, **k: count.append(1) or real(*a, **k))
    y = sub(x)
    assert len(count) == 2  # clips 0-3 in one call (two groups), clip 4 alone in another
    running = sub.running_mean.clone()
    y4 = sub(x[:4])
    assert len(count) == 3
    monkeypatch.undo()
    groups = [slice(0, 2), slice(2, 4), slice(4, 5)]
    for g in groups:  # each group exactly as BN on that group alone
        rows = x[g].flatten(0, 1)
        ref = F.batch_norm(rows, None, None, sub.weight, sub.bias, training=True)
        torch.testing.assert_close(y[g].flatten(0, 1), ref)
    torch.testing.assert_close(y4, y[:4])
    means = torch.stack([x[g].mean((0, 1, 3, 4)) for g in groups]).mean(0)
    torch.testing.assert_close(running, 0.1 * means)  # each group moved a copy; their mean


def test_stride_in_1x1_places_the_stride_and_gives_table1_receptive_fields():
    """v1 (stride on the first 1x1, Table 1: 35, 99, 291, 483) vs v1.5 (on the 3x3, torchvision).
    Measured: the input pixels whose gradient reaches a central unit of each stage, with
    positive weights and an average pool in place of pool1's max (same geometry)."""
    expected = {True: [35, 99, 291, 483], False: [35, 91, 267, 427]}
    for v1, fields in expected.items():
        net = resnet(50, num_classes=2, width=2, stride_in_1x1=v1).eval()
        for i in (2, 3, 4):
            first = getattr(net, f"layer{i}")[0]
            assert first.conv1.stride == ((2, 2) if v1 else (1, 1))
            assert first.conv2.stride == ((1, 1) if v1 else (2, 2))
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, torch.nn.Conv2d):
                    m.weight.fill_(1.0 / m.weight[0].numel())
        net.maxpool = torch.nn.AvgPool2d(3, stride=2, padding=1)
        maps: list[torch.Tensor] = []
        for stage in net.stages:
            stage.register_forward_hook(lambda m, a, out, maps=maps: maps.append(out))
        x = torch.ones(1, 3, 560, 560, requires_grad=True)
        h = net.stem(x)
        for stage in net.stages:
            h = stage(h)
        sizes = []
        for out in maps:
            centre = out[0, :, out.shape[-2] // 2, out.shape[-1] // 2].sum()
            (grad,) = torch.autograd.grad(centre, x, retain_graph=True)
            rows = torch.nonzero(grad[0].abs().sum((0, 2)) > 0)
            sizes.append(int(rows.max() - rows.min() + 1))
        assert sizes == fields, (v1, sizes)
    r = CliRunner().invoke(summary_command, ["resnet50", "--chunks", "1", "--num-classes",
                                             "1000", "--stride-in-1x1"])  # fmt: skip
    assert "multiply-adds per clip: 3.86 G" in r.output  # the paper's 3.8 G is v1's


def test_v1_and_v15_share_torchvision_keys_and_shapes():
    a = resnet(50, stride_in_1x1=True).state_dict()
    b = resnet(50).state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(width=0), r"^st_resnet50: width must be an integer >= 1, got 0$"),
        (dict(num_classes=0), r"^st_resnet50: num_classes must be an integer >= 1, got 0$"),
        (dict(flow_stack=0), r"^st_resnet50: flow_stack must be an integer >= 1, got 0$"),
        (dict(bn_sub_batch=0), r"^st_resnet50: bn_sub_batch must be an integer >= 1 or None"),
        (dict(in_channels=3), r"^st_resnet50: unknown argument 'in_channels'; known: "),
        (dict(residual_input="x"), r"^st_resnet50: residual_input must be one of pre_relu, "),
        (dict(stride_in_1x1=1), r"^st_resnet50: stride_in_1x1 must be True or False, got 1$"),
    ],
)
def test_create_model_checks_arguments_in_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_model("st_resnet50", **kwargs)


def test_bad_inputs_get_one_line_errors_naming_shape_and_dtype():
    net = create_model("resnet50", num_classes=2, width=2, in_channels=20).eval()
    cases = [
        (torch.zeros(2, 3, 32, 32),
         r"^expected clips \(B, T, 20, H, W\) or frames \(N, 20, H, W\), "
         r"got shape \(2, 3, 32, 32\)$"),
        (torch.zeros(32, 32), r"got shape \(32, 32\)$"),
        (torch.zeros(1, 2, 20, 32, 32, dtype=torch.uint8),
         r"^expected floating-point input \(normalised frames, e.g. float32\), got torch.uint8$"),
    ]  # fmt: skip
    for x, message in cases:
        with pytest.raises(ValueError, match=message):
            net(x)
    two = create_model("st_resnet50", num_classes=2, width=2, flow_stack=1)
    with pytest.raises(ValueError, match=r"^flow must be clips \(B, T, C, H, W\), got \(6, 2"):
        two(torch.zeros(2, 3, 3, 32, 32), torch.zeros(6, 2, 32, 32))
    with pytest.raises(ValueError, match=r"need the same B, T, H, W$"):
        two(torch.zeros(2, 3, 3, 32, 32), torch.zeros(3, 2, 2, 32, 32))


def test_load_pretrained_errors_say_why_in_plain_text(tmp_path):
    import io

    net = create_model("resnet50", num_classes=2, width=2)

    class NotWeights:
        def __reduce__(self):
            return (io.open, ("/dev/null",))

    torch.save({"x": NotWeights()}, tmp_path / "code.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    torch.save({"step": 3}, tmp_path / "dict.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    cases = {
        "code": r"cannot read checkpoint '.*code.pth': unsupported global io.open: "
        r"not a weights file$",
        "junk": r"cannot read checkpoint '.*junk.pth': unsupported pickle operand \d+: "
        r"not a weights file$",
        "list": r"'.*list.pth' holds a list of 1 items, not a state dict of tensors$",
        "dict": r"'.*dict.pth' holds a dict whose entry 'step' is of type int, "
        r"not a state dict of tensors$",
    }
    for name, message in cases.items():
        with pytest.raises(WeightsError) as err:
            load_pretrained(net, tmp_path / f"{name}.pth")
        text = str(err.value)
        assert "\x1b" not in text and "\n" not in text
        assert __import__("re").search(message, text), text


def test_config_keys_reach_the_model_and_old_configs_keep_their_network():
    import dataclasses

    from strnet.config import ConfigError, TrainConfig, config_from_dict, load_config
    from strnet.runtime import build_model

    base = ["model.num_classes=3", "model.width=2", "data.flow_stack=1"]
    net = build_model(load_config("st-resnet", base))
    assert [link.residual_input for link in net.links] == ["pre_relu"] * 4
    assert net.appearance.layer2[0].conv2.stride == (2, 2)  # v1.5 by default
    cfg = load_config("st-resnet", [*base, "model.residual_input=post_relu",
                                    "model.stride_in_1x1=true"])  # fmt: skip
    net = build_model(cfg)
    assert [link.residual_input for link in net.links] == ["post_relu"] * 4
    assert net.motion.layer2[0].conv1.stride == (2, 2)  # v1
    assert build_model(load_config("motion", base)).stride_in_1x1 is False
    with pytest.raises(ConfigError, match="^model.residual_input must be pre_relu or post_relu"):
        load_config("st-resnet", ["model.residual_input=relu"])
    with pytest.raises(ConfigError, match=r"^data.num_chunks = 12 leaves the last chunk out"):
        load_config("st-resnet-star", ["data.num_chunks=12"])
    assert load_config("st-resnet-star", ["data.test_chunks=11"]).data.test_chunks == 11
    # a config saved before the keys existed (a checkpoint's) rebuilds what it was trained as
    old = dataclasses.asdict(TrainConfig())
    del old["model"]["residual_input"], old["data"]["flow_offset"]
    cfg = config_from_dict(old)
    assert cfg.model.residual_input == "post_relu" and cfg.data.flow_offset == 0
    assert config_from_dict(dataclasses.asdict(TrainConfig())).model.residual_input == "pre_relu"


def test_converted_batchnorm_layers_see_frames():
    """`convert_sync_batchnorm` (run.sync_bn) swaps SubBatchNorm2d for SyncBatchNorm, which takes
    (N, C, ...) only: the network hands such layers the B*T frames of a clip batch."""
    import copy

    torch.manual_seed(0)
    net = create_model("st_resnet50", num_classes=3, width=2, flow_stack=1).eval()
    randomise_bn(net)
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(net)).eval()
    assert not any(isinstance(m, SubBatchNorm2d) for m in synced.modules())
    rgb, flow = torch.randn(2, 3, 3, 32, 32), torch.randn(2, 3, 2, 32, 32)
    with torch.no_grad():
        want, got = net(rgb, flow), synced(rgb, flow)
    for key in want:
        torch.testing.assert_close(got[key], want[key])


def test_head_dropout_drops_pooled_features_of_the_motion_stream_only():
    """model.head_dropout (the authors' 0.8 for the motion stream and STM-ResNet; the paper's
    text: none): dropout on the pooled conv5 features before fc, in training only; no new keys."""
    torch.manual_seed(0)
    plain = create_model("resnet50", num_classes=5, width=8, in_channels=4)
    dropped = create_model("resnet50", num_classes=5, width=8, in_channels=4, head_dropout=0.8)
    assert plain.state_dict().keys() == dropped.state_dict().keys()
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 4, 64, 64)
    plain.eval(), dropped.eval()
    with torch.no_grad():
        torch.testing.assert_close(dropped(x), plain(x))  # identity at test time
        pooled = plain.pool5(plain.layer4(plain.layer3(plain.layer2(plain.layer1(plain.stem(x))))))
    dropped.drop.train()  # BatchNorm stays in eval mode: only the dropout differs from `plain`
    torch.manual_seed(1)
    with torch.no_grad():
        got = dropped.head(dropped.layer4(dropped.layer3(dropped.layer2(dropped.layer1(
            dropped.stem(x))))))  # fmt: skip
    torch.manual_seed(1)
    kept = F.dropout(pooled.mean(dim=(-2, -1)), 0.8, training=True)
    torch.testing.assert_close(got, plain.fc(kept))
    st = create_model("stm_resnet50", num_classes=5, width=8, flow_stack=2, head_dropout=0.8)
    assert st.motion.drop is not None and st.motion.drop.p == 0.8 and st.appearance.drop is None
    assert create_model("st_resnet50", num_classes=5, width=8).motion.drop is None  # default
    with pytest.raises(ValueError, match=r"^resnet50: head_dropout must be in \[0, 1\), got 1"):
        create_model("resnet50", num_classes=5, width=8, head_dropout=1)
    with pytest.raises(ValueError, match="^resnet3d18: unknown argument 'head_dropout'"):
        create_model("resnet3d18", num_classes=5, width=8, head_dropout=0.5)
