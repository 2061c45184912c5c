"""Two-Stream Fusion (CVPR 2016): Table 1 parameter counts, the fusion functions of Sec. 3.1,
the 3D conv fusion of Sec. 3.5, padding, errors, `strnet summary`, and training through the
reader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_strnet_train import tiny, write_clip_folder

from strnet.cli import eval_command, summary_command
from strnet.config import ConfigError, load_config
from strnet.fusion import (
    BilinearFusion,
    Conv3dFusion,
    ConvFusion,
    SumFusion,
    gaussian3,
    make_fusion,
    match_sizes,
)
from strnet.models import create_model
from strnet.runtime import build_model
from strnet.train import clip_loss, train
from strnet.weights import load_pretrained


# --------------------------------------------------------------------------- Table 1
def conv(cin: int, cout: int, k: int) -> int:
    return cout * cin * k * k + cout


def vggm2048_by_hand(in_channels: int, num_classes: int = 101) -> tuple[int, int]:
    """(conv1-5, fc6-8) parameters of VGG-M-2048 (Chatfield et al. 2014), from its table:
    conv1 96x7x7, conv2 256x5x5, conv3-5 512x3x3, pool5 6x6x512, fc6 4096, fc7 2048."""
    convs = conv(in_channels, 96, 7) + conv(96, 256, 5) + conv(256, 512, 3) + 2 * conv(512, 512, 3)
    fcs = conv(512, 4096, 6) + conv(4096, 2048, 1) + conv(2048, num_classes, 1)
    return convs, fcs


RGB, FLOW = vggm2048_by_hand(3), vggm2048_by_hand(20)
D = 512  # relu5 channels
CONV = conv(2 * D, D, 1)  # eq. 4's 1x1 fusion filter, 2D -> D, with biases
TABLE1 = {  # row: (create_model arguments, our count from the table above, paper's count)
    "sum@softmax": ({"fusion": "sum", "fuse_at": "softmax"}, sum(RGB) + sum(FLOW), 181.42e6),
    "max@relu5": ({"fusion": "max"}, sum(RGB) + FLOW[0], 97.31e6),
    "sum@relu5": ({"fusion": "sum"}, sum(RGB) + FLOW[0], 97.31e6),
    "conv@relu5": ({"fusion": "conv"}, sum(RGB) + FLOW[0] + CONV, 97.58e6),
    "concat@relu5": ({"fusion": "concat"}, sum(RGB) + FLOW[0] + 4096 * 6 * 6 * D, 172.81e6),
    # Table 2, ReLU5 + FC8 (Fig. 2 right): both towers kept, their scores averaged (no parameters)
    "conv@relu5+fc8": (
        {"fusion": "conv", "fuse_at": "relu5+fc8", "truncate": False},
        sum(RGB + FLOW) + CONV,
        181.68e6,
    ),
}
# What is left between the paper's Table 1 and an exact count (docs/strnet.md, "Two-Stream Fusion"):
# - every row is ~80 K above ours: the paper's numbers are those of two towers whose conv1 both
#   take 2L = 20 channels (96 x 17 x 7 x 7 = 79,968 more), e.g. 181,415,562 = 181.42 M;
#   97,316,389 is printed 97.31 M (cut, not rounded) and 172,813,861 172.81 M.
# - conv fusion: the paper's conv - sum = 0.27 M is a D x D filter with biases (262,656), but
#   eq. 4 (and insert_conv_layers.m) filter 2D -> D: 1x1x1024x512 + 512 = 524,800 (ours).
CONV1_AS_FLOW = 96 * 17 * 7 * 7
PAPER_CONV_FILTER = D * D + D


def count(name: str, **kw) -> int:
    with torch.device("meta"):  # no memory, no init time: 181 M parameters in milliseconds
        return sum(p.numel() for p in create_model(name, **kw).parameters())


@pytest.mark.parametrize("row", sorted(TABLE1))
def test_table1_parameter_counts(row):
    kw, by_hand, paper = TABLE1[row]
    truncate = kw.get("fuse_at") != "softmax"
    kw = {"fuse_at": "relu5", "truncate": truncate, **kw}
    ours = count("fusion_vggm2048", num_classes=101, flow_stack=10, **kw)
    assert ours == by_hand
    if kw["fusion"] == "conv":
        assert ours - count("fusion_vggm2048", **{**kw, "fusion": "sum"}) == 2 * D * D + D
        assert abs(ours - paper) == pytest.approx(0.18e6, abs=0.01e6)  # the filter: see above
        ours += PAPER_CONV_FILTER - CONV
    assert abs(ours - paper) < 0.1e6
    as_paper = ours + CONV1_AS_FLOW  # conv1 of the appearance tower counted with 20 channels
    printed = {f"{as_paper / 1e6:.2f}", f"{int(as_paper / 1e4) / 100:.2f}"}  # rounded or cut
    assert f"{paper / 1e6:.2f}" in printed


def test_table2_fusion_at_three_layers_parameter_count():
    """Table 2's last row, ReLU3 + ReLU5 + FC6 (190,06M): conv fusion at each, motion tower cut
    after fc6. With the paper's counting (D x D filters, conv1 of 20 channels) ours is 190.12 M;
    the 0.06 M left is not explained (both towers' other layers match Table 1 exactly)."""
    kw = dict(num_classes=101, flow_stack=10, fusion="conv", fuse_at="relu3+relu5+fc6")
    ours = count("fusion_vggm2048", truncate=True, **kw)
    motion_fc7_fc8 = conv(4096, 2048, 1) + conv(2048, 101, 1)
    filters = 2 * CONV + conv(2 * 4096, 4096, 1)  # relu3 and relu5: 512 channels, fc6: 4096
    assert ours == sum(RGB + FLOW) - motion_fc7_fc8 + filters
    as_paper = ours - filters + 2 * PAPER_CONV_FILTER + conv(4096, 4096, 1) + CONV1_AS_FLOW
    assert as_paper == 190_124_581 and abs(as_paper - 190.06e6) < 0.1e6


def test_fusion_at_several_layers_runs_the_motion_tower_beside():
    """relu3+relu5+fc8: the motion map is added into the appearance tower at relu3 and again at
    relu5 (the motion tower itself runs on unfused), then the two towers' scores are averaged."""
    torch.manual_seed(0)
    net = create_model("fusion_vggm2048", num_classes=5, width=4, flow_stack=2, fusion="sum",
                       fuse_at="relu3+relu5+fc8").eval()  # fmt: skip
    rgb, flow = torch.randn(2, 3, 3, 96, 96), torch.randn(2, 3, 4, 96, 96)
    a, m = net.appearance, net.motion
    with torch.no_grad():
        out = net(rgb, flow)
        m3, m5 = m.run(flow, None, "relu3"), m.run(flow, None, "relu5")
        y = a.run(a.run(rgb, None, "relu3") + m3, "relu3", "relu5") + m5
        expected = (a.run(y, "relu5", None) + m.run(flow)) / 2
    assert set(out) == {"fusion"} and out["fusion"].shape == (2, 3, 5)
    torch.testing.assert_close(out["fusion"], expected)
    assert len(net.more_fusions) == 1 and not net.motion.dropped_layers  # the tower is whole
    conv = create_model("fusion_vggm2048", num_classes=5, width=4, flow_stack=2, fusion="conv",
                        fuse_at="relu3+relu5+fc8")  # fmt: skip
    assert sorted(conv.fresh_keys()) == [
        f"{layer}.conv.{p}" for layer in ("fusion", "more_fusions.0") for p in ("bias", "weight")
    ]
    frozen = create_model("fusion_vggm2048", num_classes=5, width=4, flow_stack=2, fusion="conv",
                          fuse_at="relu3+relu5+fc8", freeze_towers=True)  # fmt: skip
    out = frozen(torch.randn(1, 1, 3, 96, 96), torch.randn(1, 1, 4, 96, 96))
    out["fusion"].sum().backward()
    grads = {n.split(".")[0] + "." + n.split(".")[1] for n, p in frozen.named_parameters()
             if p.grad is not None}  # fmt: skip
    assert {"appearance.conv4", "appearance.conv5", "motion.conv4", "motion.fc8"} <= grads
    assert not grads & {"appearance.conv3", "motion.conv3", "appearance.conv1"}  # below relu3
    resnet = create_model("fusion_resnet50", num_classes=5, width=4, flow_stack=2, fusion="conv",
                          fuse_at="layer3+layer4+fc8").eval()  # fmt: skip
    with torch.no_grad():
        out = resnet(torch.randn(1, 2, 3, 64, 64), torch.randn(1, 2, 4, 64, 64))
    assert set(out) == {"fusion"} and out["fusion"].shape == (1, 2, 5)


def test_softmax_fusion_is_the_two_stream_baseline():
    kw = dict(num_classes=7, width=4, flow_stack=2)
    torch.manual_seed(0)
    net = create_model("fusion_vggm2048", **kw).eval()  # defaults: sum at the softmax layer
    out = net(torch.randn(2, 3, 3, 64, 64), torch.randn(2, 3, 4, 64, 64))
    assert set(out) == {"appearance", "motion"} and out["appearance"].shape == (2, 3, 7)
    assert count("fusion_vggm2048", **kw) == count("vggm2048", num_classes=7, width=4) + count(
        "vggm2048", num_classes=7, width=4, in_channels=4
    )


# --------------------------------------------------------------------------- fusion functions
def test_conv_fusion_at_init_equals_sum():
    torch.manual_seed(0)
    xa, xm = torch.randn(2, 3, 16, 5, 6), torch.randn(2, 3, 16, 5, 6)  # negative values too
    torch.testing.assert_close(ConvFusion(16, 16)(xa, xm), SumFusion(16, 16)(xa, xm))
    torch.testing.assert_close(ConvFusion(16, 16)(xa[:, 0], xm[:, 0]), xa[:, 0] + xm[:, 0])
    # and so does the whole network: fused after relu5, towers drawn alike
    nets = {}
    for kind in ("sum", "conv"):
        torch.manual_seed(1)
        nets[kind] = create_model("fusion_vggm2048", num_classes=5, width=4, flow_stack=2,
                                  fusion=kind, fuse_at="relu5").eval()  # fmt: skip
    rgb, flow = torch.randn(1, 2, 3, 64, 64), torch.randn(1, 2, 4, 64, 64)
    with torch.no_grad():
        a, b = nets["sum"](rgb, flow), nets["conv"](rgb, flow)
    assert set(a) == set(b) == {"fusion", "motion"}
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_bilinear_fusion_is_d_squared_signed_sqrt_l2():
    torch.manual_seed(0)
    xa, xm = torch.randn(2, 3, 6, 4, 5), torch.randn(2, 3, 6, 4, 5)
    y = BilinearFusion(6, 6)(xa, xm)
    assert y.shape == (2, 3, 36)
    pairs = [(xa[..., i, j], xm[..., i, j]) for i in range(4) for j in range(5)]  # (2, 3, 6) each
    outer = sum(a[..., :, None] * m[..., None, :] for a, m in pairs)
    want = outer.flatten(-2)
    want = torch.sign(want) * want.abs().sqrt()
    torch.testing.assert_close(y, want / want.norm(dim=-1, keepdim=True), atol=1e-5, rtol=1e-4)
    net = create_model("fusion_vggm2048", num_classes=5, width=8, flow_stack=2,
                       fusion="bilinear", fuse_at="relu5", truncate=True)  # fmt: skip
    d = 512 * 8 // 64
    assert net.classifier.in_features == d * d and "fc6" in net.appearance.dropped_layers
    out = net(torch.randn(1, 2, 3, 64, 64), torch.randn(1, 2, 4, 64, 64))
    assert set(out) == {"fusion"} and out["fusion"].shape == (1, 2, 5)


def test_maps_one_row_and_column_smaller_are_zero_padded():
    torch.manual_seed(0)
    xa, xm = torch.randn(1, 2, 3, 14, 14), torch.randn(1, 2, 3, 13, 13)
    pa, pm = match_sizes(xa, xm)
    assert pa is xa and pm.shape == (1, 2, 3, 14, 14)
    assert torch.equal(pm[..., :13, :13], xm) and not pm[..., 13, :].any() and not pm[..., 13].any()
    y = SumFusion(3, 3)(xa, xm)
    torch.testing.assert_close(y[..., 13, :], xa[..., 13, :])
    with pytest.raises(ValueError, match=r"^cannot fuse maps of 14 x 14 \(appearance\) and 12 x"):
        SumFusion(3, 3)(xa, torch.randn(1, 2, 3, 12, 12))
    # Table 4: a VGG-16 appearance tower (relu5_3 14 x 14) and a VGG-M motion tower (13 x 13)
    net = create_model("fusion_vgg16", num_classes=4, width=2, flow_stack=2, fusion="conv",
                       fuse_at="relu5", motion_net="vggm2048").eval()  # fmt: skip
    seen = []
    net.fusion.register_forward_hook(lambda m, args, out: seen.append((args, out)))
    with torch.no_grad():
        out = net(torch.randn(1, 1, 3, 224, 224), torch.randn(1, 1, 4, 224, 224))
    (xa, xm), y = seen[0]
    assert xa.shape[-2:] == (14, 14) and xm.shape[-2:] == (13, 13) and y.shape[-2:] == (14, 14)
    assert out["fusion"].shape == out["motion"].shape == (1, 1, 4)


def test_conv3d_fusion_init_and_3d_pooling():
    torch.manual_seed(0)
    g = gaussian3()
    assert g.shape == (3, 3, 3) and g.sum().item() == pytest.approx(1.0)
    assert g[1, 1, 1] / g[0, 1, 1] == pytest.approx(np.exp(0.5))  # sigma 1
    fusion = Conv3dFusion(4, 4)
    w = fusion.conv.weight  # (D, 2D, T, H, W)
    assert w.shape == (4, 8, 3, 3, 3)
    torch.testing.assert_close(w[:, :4].sum((2, 3, 4)), 0.25 * torch.eye(4))
    torch.testing.assert_close(w[:, 4:].sum((2, 3, 4)), 0.75 * torch.eye(4))  # motion x3
    xa = torch.rand(2, 1, 4, 1, 1).expand(2, 5, 4, 6, 6)  # clips constant over space and time
    xm = torch.rand(2, 1, 4, 1, 1).expand(2, 5, 4, 6, 6)
    y = fusion(xa, xm)
    torch.testing.assert_close(y[:, 1:4, :, 1:5, 1:5], (0.25 * xa + 0.75 * xm)[:, 1:4, :, 1:5, 1:5])
    net = create_model("fusion_vggm2048", num_classes=3, width=4, flow_stack=2, fusion="conv3d",
                       fuse_at="relu5").eval()  # fmt: skip
    assert net.pool3d and net.appearance.tpool is not None and net.motion.tpool is not None
    with torch.no_grad():
        out = net(torch.randn(2, 5, 3, 64, 64), torch.randn(2, 5, 4, 64, 64))
    assert set(out) == {"fusion", "motion"}  # both losses, averaged at test
    assert all(v.shape == (2, 1, 3) for v in out.values())  # 5 chunks pooled into one


def test_fusion_after_an_earlier_layer_and_resnet_towers():
    torch.manual_seed(0)
    net = create_model("fusion_vgg16", num_classes=3, width=2, flow_stack=2, fusion="concat",
                       fuse_at="relu4_3", truncate=True).eval()  # fmt: skip
    assert net.appearance.conv5_1.in_channels == 2 * net.appearance.conv4_3.out_channels
    assert "conv5_1" in net.motion.dropped_layers
    out = net(torch.randn(1, 2, 3, 64, 64), torch.randn(1, 2, 4, 64, 64))
    assert out["fusion"].shape == (1, 2, 3) and set(out) == {"fusion"}
    net = create_model("fusion_resnet50", num_classes=3, width=4, flow_stack=2, fusion="conv",
                       fuse_at="layer3").eval()  # fmt: skip
    with torch.no_grad():
        out = net(torch.randn(1, 2, 3, 64, 64), torch.randn(1, 2, 4, 64, 64))
    assert set(out) == {"fusion", "motion"} and out["motion"].shape == (1, 2, 3)


def test_single_stream_checkpoints_load_into_cut_and_widened_towers(tmp_path):
    """init_appearance / init_motion: a whole VGG tower's file fills a truncated motion tower
    (its later layers skipped) and an appearance tower whose fc6 concatenation widened."""
    torch.manual_seed(0)
    kw = dict(num_classes=3, width=4)
    torch.save(create_model("vggm2048", **kw).state_dict(), tmp_path / "rgb.pt")
    torch.save(create_model("vggm2048", in_channels=4, **kw).state_dict(), tmp_path / "flow.pt")
    net = create_model("fusion_vggm2048", flow_stack=2, fusion="concat", fuse_at="relu5",
                       truncate=True, **kw)  # fmt: skip
    report = load_pretrained(net.motion, tmp_path / "flow.pt")
    assert report.unexpected == [] and report.missing == [] and "fc6.weight" not in report.loaded
    report = load_pretrained(net.appearance, tmp_path / "rgb.pt")
    assert report.missing == ["fc6.weight"] and report.mismatched[0].startswith("fc6.weight ")
    saved = torch.load(tmp_path / "rgb.pt", weights_only=True)
    assert torch.equal(net.appearance.conv5.weight, saved["conv5.weight"])
    assert net.appearance.fc6.weight.shape[1] == 2 * saved["fc6.weight"].shape[1]


def test_single_stream_resnet_loads_into_a_tower_concatenation_widened():
    """Concatenation after layer3 doubles the inputs of layer4's first unit: those two convs
    start fresh, every other key comes from the single-stream checkpoint."""
    torch.manual_seed(0)
    kw = dict(num_classes=3, width=4)
    saved = create_model("resnet50", **kw).state_dict()
    net = create_model("fusion_resnet50", flow_stack=2, fusion="concat", fuse_at="layer3", **kw)
    report = load_pretrained(net.appearance, saved)
    fresh = ["layer4.0.conv1.weight", "layer4.0.downsample.0.weight"]
    assert sorted(m.split()[0] for m in report.mismatched) == fresh
    assert report.unexpected == [] and sorted(report.missing) == fresh
    assert torch.equal(net.appearance.layer4[0].conv2.weight, saved["layer4.0.conv2.weight"])
    assert net.appearance.layer4[0].conv1.in_channels == 2 * saved["layer3.5.conv3.weight"].shape[0]
    net(torch.randn(1, 1, 3, 64, 64), torch.randn(1, 1, 4, 64, 64))


def test_frozen_towers_train_only_from_the_fusion_on():
    torch.manual_seed(0)
    net = create_model("fusion_resnet50", num_classes=3, width=4, flow_stack=2, fusion="conv",
                       fuse_at="layer3", freeze_towers=True)  # fmt: skip
    out = net(torch.randn(2, 1, 3, 64, 64), torch.randn(2, 1, 4, 64, 64))
    sum(s.sum() for s in out.values()).backward()
    grads = {n for n, p in net.named_parameters() if p.grad is not None}
    assert {n for n, p in net.named_parameters() if p.requires_grad} == grads
    assert "fusion.conv.weight" in grads and "appearance.layer4.0.conv1.weight" in grads
    assert "motion.fc.weight" in grads and "motion.layer4.0.conv1.weight" in grads
    assert not grads & {"appearance.conv1.weight", "motion.layer3.5.bn3.weight"}
    with pytest.raises(ValueError, match="^freeze_towers needs a fusion layer"):
        create_model("fusion_vgg16", width=2, freeze_towers=True)
    frozen, trained = net.motion.layer3[5].bn3, net.motion.layer4[0].bn1
    before = frozen.running_mean.clone(), trained.running_mean.clone()
    net.train()  # frozen towers keep their BN statistics; layers after the fusion update theirs
    assert not frozen.training and trained.training
    net(torch.randn(2, 1, 3, 64, 64), torch.randn(2, 1, 4, 64, 64))
    assert torch.equal(frozen.running_mean, before[0])
    assert not torch.equal(trained.running_mean, before[1])


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"fusion": "product"}, "unknown fusion 'product'; known: sum, max, concat, conv, "),
        ({"fusion": "sum", "fuse_at": "relu9"}, "unknown layer 'relu9' of vggm2048; known: "),
        ({"fusion": "conv", "fuse_at": "softmax"}, "fusion at the softmax layer averages both"),
        ({"fuse_at": "relu5", "truncate": "yes"}, "truncate must be true or false, got 'yes'"),
        ({"dropout": 1.5}, "dropout must be in [0, 1), got 1.5"),
        ({"dropout": "high"}, "dropout must be in [0, 1), got high"),
        ({"motion_net": "vgg19"}, "unknown VGG backbone 'vgg19'; known: vggm2048, vgg16"),
        ({"fusion": "sum", "fuse_at": "relu5+relu3"}, "fuse_at 'relu5+relu3': list the layers in"),
        ({"fusion": "sum", "fuse_at": "fc8+relu5"}, "fuse_at 'fc8+relu5': fc8 (the scores) can"),
        ({"fusion": "sum", "fuse_at": "relu5+relu5"}, "fuse_at 'relu5+relu5': name each layer"),
        ({"fusion": "bilinear", "fuse_at": "relu3+relu5"}, "fusion at several layers ('relu3+"),
        ({"fusion": "conv", "fuse_at": "relu5+fc8", "truncate": True}, "fuse_at 'relu5+fc8' aver"),
    ],
)
def test_bad_arguments_are_one_line_errors(kw, message):
    with pytest.raises(ValueError) as err:
        create_model("fusion_vggm2048", num_classes=3, width=2, **kw)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="^max fusion pairs channels one to one: appearance"):
        make_fusion("max", 8, 4)


def test_summary_of_fusion_models():
    args = ["fusion_vggm2048", "--set", "fusion=conv", "--set", "fuse_at=relu5", "--set",
            "truncate=true", "--chunks", "1"]  # fmt: skip
    r = CliRunner().invoke(summary_command, args)
    assert r.exit_code == 0, r.output
    assert "parameters: 97,761,221 (appearance 90,627,813, motion 6,608,608, fusion 524,800)" in (
        r.output
    )
    assert "appearance  pool5    6 x 6 x 1, 512" in r.output  # 13 x 13 relu5 pooled
    assert "motion      conv5    13 x 13 x 1, 512" in r.output
    assert "fusion      conv     13 x 13 x 1, 512" in r.output
    args = ["fusion_vggm2048", "--set", "fuse_at=fc9", "--set", "fusion=sum", "--base-width", "4"]
    r = CliRunner().invoke(summary_command, args)
    assert r.exit_code == 1 and r.output.startswith("Error: unknown layer 'fc9' of vggm2048")


# --------------------------------------------------------------------------- configs
def test_shipped_fusion_phases_and_their_model():
    table1, proposed = load_config("fusion"), load_config("fusion-3d")
    for cfg in (table1, proposed):  # Sec. 3.5: batch 96, lr 1e-3 then x0.1, dropout 0.85
        assert cfg.optim.batch_size == 96 and cfg.optim.lrs == [1e-3, 1e-4, 1e-5, 1e-6]
        assert cfg.optim.iterations == [1988, 994, 994, 994] and cfg.model.dropout == 0.85
        assert cfg.data.flow_stack == 10 and cfg.model.fuse_at == "relu5"
    assert (table1.model.name, table1.model.fusion, table1.model.truncate) == (
        "fusion_vggm2048", "conv", True)  # fmt: skip
    assert (proposed.model.name, proposed.model.fusion, proposed.model.truncate) == (
        "fusion_vgg16", "conv3d", False)  # fmt: skip
    assert proposed.data.num_chunks == 5 and (proposed.data.tau_min, proposed.data.tau_max) == (
        1, 10)  # fmt: skip
    assert table1.model.freeze_towers and proposed.model.freeze_towers
    cfg = load_config("fusion", ["model.num_classes=101"])
    with pytest.raises(ConfigError, match=r"^model.freeze_towers trains only the layers from the "):
        build_model(cfg)  # frozen towers must come trained
    cfg = load_config("fusion", ["model.num_classes=101", "model.init_motion='motion.pt'"])
    with torch.device("meta"):
        net = build_model(cfg)
    assert sum(p.numel() for p in net.parameters()) == TABLE1["conv@relu5"][1]
    frozen = {n.split(".")[0] + "." + n.split(".")[1] for n, p in net.named_parameters()
              if not p.requires_grad}  # fmt: skip
    assert frozen == {f"{t}.conv{i}" for t in ("appearance", "motion") for i in range(1, 6)}
    with pytest.raises(ConfigError, match=r"^data.num_chunks = 6 leaves the last chunk out"):
        load_config("fusion-3d", ["data.num_chunks=6"])
    cfg = load_config("st-resnet", ["model.num_classes=3", "model.fusion='max'"])
    with pytest.raises(ConfigError, match=r"^model.fusion is a setting of the fusion_\* models, "):
        build_model(cfg)


# --------------------------------------------------------------------------- training
@pytest.mark.parametrize("phase", ["fusion", "fusion-3d"])
def test_tiny_fusion_model_overfits_through_the_reader(tmp_path, phase):
    """Conv fusion after relu5 (Table 1, one tower) and the 3D conv fusion of Sec. 3.4 (both
    towers, both losses), VGG-M-2048 at 1/8 width, read from frame folders by flowprep's reader."""
    clips = write_clip_folder(tmp_path / "clips", size=(56, 64))  # 48^2 crops: relu5 2 x 2
    torch.manual_seed(0)
    cfg = tiny(
        clips, tmp_path / "run", "model.name='fusion_vggm2048'", "model.dropout=0.0",
        "data.crop_size=48", "data.num_chunks=3", "data.tau_min=1", "data.tau_max=2",
        "data.test_chunks=3", "optim.batch_size=6", "optim.micro_batch=6", "optim.lrs=[0.01]",
        "optim.iterations=[25]", "model.freeze_towers=false", config=phase,
    )  # fmt: skip
    summary = train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["step"] == 25
    assert np.mean([r["loss"] for r in rows[-3:]]) < 0.5 * np.mean([r["loss"] for r in rows[:3]])
    assert [r["acc"] for r in rows[-3:]] == [1.0, 1.0, 1.0]
    out = tmp_path / "eval"  # strnet eval: each output's scores saved, their average scored
    args = [str(tmp_path / "run" / "checkpoint.pt"), "--split", "1", "--data", str(clips),
            "--protocol", "center", "--test-chunks", "3", "--out", str(out)]  # fmt: skip
    r = CliRunner().invoke(eval_command, args)
    assert r.exit_code == 0, r.output
    with np.load(out / "run_split1_scores.npz", allow_pickle=False) as z:
        streams = {"fusion"} if phase == "fusion" else {"fusion", "motion"}
        assert {f[len("scores_") :] for f in z.files if f.startswith("scores_")} == streams
        fused = np.mean([z[f"scores_{s}"] for s in streams], axis=0)
        top1 = float((fused.argmax(1) == z["labels"]).mean())
    assert json.loads((out / "run_split1.json").read_text())["top1"] == top1 == 1.0


# --------------------------------------------------------------------------- VGG-16 ImageNet
def torchvision_vgg16_state(net) -> dict:
    """Random weights of `net`'s shapes under torchvision's VGG-16 keys (features.<i>: conv
    layers at torchvision's indices, classifier.0/3/6 Linear, fc6 flattened over (C, 7, 7))."""
    torch.manual_seed(3)
    state, index = {}, 0
    for name in [n for n in net.names if n.startswith(("conv", "relu", "pool"))]:
        layer = getattr(net, name)
        if name.startswith("conv"):
            state[f"features.{index}.weight"] = torch.randn_like(layer.weight) * 0.2
            state[f"features.{index}.bias"] = torch.randn_like(layer.bias)
        index += 1
    for key, name in (("classifier.0", "fc6"), ("classifier.3", "fc7"), ("classifier.6", "fc8")):
        w = getattr(net, name).weight
        rows = 1000 if name == "fc8" else w.shape[0]
        state[f"{key}.weight"] = torch.randn(rows, w[0].numel()) * 0.01
        state[f"{key}.bias"] = torch.randn(rows)
    return state


def test_vgg16_imagenet_weights_from_torchvisions_file(tmp_path, monkeypatch):
    """model.init=imagenet on a VGG-16 tower reads torchvision's vgg16-397923af.pth through the
    hub cache (here a file:// URL): convs copied, fc6 reshaped so it computes torchvision's
    Linear over the flattened pool5, fc8 a new head; a flow tower gets the mean RGB filter."""
    import hashlib

    from strnet import weights

    assert weights.hub_path(weights.VGG16_URL).name == "vgg16-397923af.pth"
    net = create_model("vgg16", num_classes=3, width=4).eval()
    state = torchvision_vgg16_state(net)
    assert [k for k in state if k.startswith("features.")][:4] == [
        "features.0.weight", "features.0.bias", "features.2.weight", "features.2.bias"
    ]  # fmt: skip
    tmp = tmp_path / "server" / "tmp.pth"
    tmp.parent.mkdir()
    torch.save(state, tmp)
    path = tmp.rename(
        tmp.with_name(f"vgg16tiny-{hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]}.pth")
    )
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(weights, "_verified", {})
    monkeypatch.setenv(weights.IMAGENET_URL_ENV, path.as_uri())
    report = load_pretrained(net, "imagenet")
    assert sorted(report.missing) == ["fc8.bias", "fc8.weight"] and not report.unexpected
    assert torch.equal(net.conv5_3.weight, state["features.28.weight"])
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        pool5 = net.run(x[:, None], None, "pool5")[:, 0]
        fc6 = net.run(x[:, None], None, "fc6")[:, 0, :, 0, 0]
    linear = torch.nn.functional.linear
    ref = linear(pool5.flatten(1), state["classifier.0.weight"], state["classifier.0.bias"])
    torch.testing.assert_close(fc6, ref, rtol=0, atol=1e-5 * ref.abs().max().item())  # float32
    fused = create_model("fusion_vgg16", num_classes=3, width=4, flow_stack=2, fusion="conv",
                         fuse_at="relu5", truncate=True)  # fmt: skip
    report = load_pretrained(fused.motion, "imagenet")
    assert "conv1_1.weight" in report.adapted and "fc6.weight" not in report.loaded  # cut away
    rgb_mean = state["features.0.weight"].mean(dim=1, keepdim=True).expand(-1, 4, -1, -1)
    assert torch.equal(fused.motion.conv1_1.weight, rgb_mean)
    with pytest.raises(Exception, match="^imagenet: torchvision's ImageNet files are ResNets"):
        load_pretrained(create_model("vggm2048", num_classes=3, width=2), "imagenet")


# --------------------------------------------------------------------------- bilinear + SVM
def test_hinge_loss_is_the_multiclass_svm_of_table1():
    """optim.loss = "hinge": Weston-Watkins' hinge, sum over wrong classes j of
    max(0, 1 - s_y + s_j) / K, averaged over positions; zero once every margin is met."""
    scores = torch.tensor([[[3.0, 1.5, -2.0], [0.2, 0.5, 0.0]]])  # (B=1, T=2, K=3)
    labels = torch.tensor([0])
    by_hand = (0 + 0) / 3, (max(0, 1 - 0.2 + 0.5) + max(0, 1 - 0.2 + 0.0)) / 3
    got = clip_loss({"fusion": scores}, labels, "hinge")
    assert got.item() == pytest.approx(sum(by_hand) / 2)
    assert clip_loss({"fusion": scores[:, :1]}, labels, "hinge").item() == 0.0
    assert clip_loss({"fusion": scores}, labels).item() > got.item()  # cross-entropy by default
    with pytest.raises(ConfigError, match="^optim.loss must be one of softmax, hinge, got 'svm'"):
        load_config("fusion", ["optim.loss='svm'"])
