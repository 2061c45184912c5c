"""Pretrained weights in one place: read safely, adapt conv1 to flow stacks, inflate over time.

Pure functions over state dicts with torchvision keys. A checkpoint is read with
`torch.load(..., weights_only=True)` only. The one download is `imagenet` (`model.init=imagenet`):
torchvision's ResNet V1 file of the network's depth (ResNet-50 for the two-stream papers, 18/34
inflated for 3D ResNets), fetched once by `torch.hub.load_state_dict_from_url` with
`check_hash=True` into torch's hub cache and checked against its sha256 prefix whenever it is read.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlparse

import torch
from torch import nn

from strnet.vgg import vgg16_layers

STRIP_PREFIXES = ("module.", "_orig_mod.")
CONV1_RULES = ("authors", "timm")
HEAD_KEYS = ("fc.weight", "fc.bias", "fc8.weight", "fc8.bias")  # classifiers (ResNet, VGG):
# a new dataset's is re-initialised
OPTIONAL_KEYS = ("num_batches_tracked",)  # absent from old torchvision files
IMAGENET = "imagenet"  # the `model.init*` value that names torchvision's ImageNet ResNet-50
# torchvision's ResNet50_Weights.IMAGENET1K_V1 (76.13 % top-1): the original ResNet-50 training
# recipe, the weights of the two-stream papers' era (V2, 80.86 %, is a 2021 recipe).
IMAGENET_URL = "https://download.pytorch.org/models/resnet50-0676ba61.pth"
IMAGENET_URLS = {  # torchvision's IMAGENET1K_V1 file of each depth
    18: "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    34: "https://download.pytorch.org/models/resnet34-b627a593.pth",
    50: IMAGENET_URL,
    101: "https://download.pytorch.org/models/resnet101-63fe2227.pth",
    152: "https://download.pytorch.org/models/resnet152-394f9c45.pth",
}
RESNET_BLOCKS = {  # (blocks per stage, bottleneck) -> depth, for 2D and 3D ResNets alike
    ((2, 2, 2, 2), False): 18,
    ((3, 4, 6, 3), False): 34,
    ((3, 4, 6, 3), True): 50,
    ((3, 4, 23, 3), True): 101,
    ((3, 8, 36, 3), True): 152,
}
# torchvision's VGG16_Weights.IMAGENET1K_V1 (71.59 % top-1): the very deep tower of Two-Stream
# Fusion (Sec. 3.5). VGG-M-2048 has no torchvision file (the authors' imagenet-vgg-m-2048.mat is
# MatConvNet's; convert it to a state dict with our key names and give model.init that file).
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
IMAGENET_URL_ENV = "STRNET_IMAGENET_URL"  # another URL of a file named <name>-<sha256 prefix>.<ext>
_verified: dict[Path, tuple[int, int]] = {}  # hub files whose hash matched: (size, mtime_ns)


class WeightsError(RuntimeError):
    """A missing, unreadable or mismatched weights file; the message is one line."""


def strip_prefixes(state_dict: dict) -> dict:
    """Drop DDP `module.` and torch.compile `_orig_mod.` key prefixes, however nested."""
    out = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in STRIP_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix) :], True
        out[key] = value
    return out


def imagenet_url(depth: int = 50) -> str:
    """The URL `imagenet` stands for: $STRNET_IMAGENET_URL if set, else torchvision's V1 file of
    a ResNet of `depth` layers (`IMAGENET_URLS`)."""
    return os.environ.get(IMAGENET_URL_ENV) or IMAGENET_URLS[depth]


def resnet_depth(module: nn.Module) -> int | None:
    """The torchvision depth of a 2D or 3D ResNet (its blocks per stage), None for another net."""
    try:
        stages = tuple(len(getattr(module, f"layer{i}")) for i in range(1, 5))
        bottleneck = hasattr(module.layer1[0], "conv3")
    except (AttributeError, TypeError, IndexError):
        return None
    return RESNET_BLOCKS.get((stages, bottleneck))


def vgg16_from_torchvision(state: dict) -> dict:
    """torchvision's VGG-16 keys and shapes -> `strnet.vgg`'s: `features.<i>` are conv1_1 ...
    conv5_3 in order; classifier.0/3/6 (Linear) become fc6 (a 7 x 7 conv over pool5: torchvision
    flattens pool5 as (C, H, W), so the weight is reshaped, not permuted), fc7 and fc8 (1 x 1)."""
    names = [s[0] for s in vgg16_layers() if isinstance(s, tuple) and s[0].startswith("conv")]
    convs = sorted({int(k.split(".")[1]) for k in state if k.startswith("features.")})
    fcs = {"classifier.0": "fc6", "classifier.3": "fc7", "classifier.6": "fc8"}
    if len(convs) != len(names) or not all(f"{k}.weight" in state for k in fcs):
        raise WeightsError(
            f"imagenet (VGG-16): expected torchvision's 13 conv and 3 linear layers, got "
            f"{len(convs)} conv layers and keys {', '.join(sorted(state)[:4])} ..."
        )
    out = {}
    for index, name in zip(convs, names, strict=True):
        for part in ("weight", "bias"):
            out[f"{name}.{part}"] = state[f"features.{index}.{part}"]
    for key, name in fcs.items():
        weight = state[f"{key}.weight"]
        cin = weight.shape[1] // 49 if name == "fc6" else weight.shape[1]
        side = 7 if name == "fc6" else 1
        out[f"{name}.weight"] = weight.reshape(weight.shape[0], cin, side, side)
        out[f"{name}.bias"] = state[f"{key}.bias"]
    return out


def hub_path(url: str) -> Path:
    """Where `torch.hub.load_state_dict_from_url` keeps `url`: <hub dir>/checkpoints/<name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def check_cached_hash(path: Path) -> None:
    """Raise WeightsError (one line) unless the sha256 of `path` starts with its name's prefix.

    torch.hub checks the hash only while downloading; a file damaged in the cache later would
    load (or fail to unpickle) silently, so strnet checks it on every first read in a process.
    """
    match = torch.hub.HASH_REGEX.search(path.name)
    prefix = match.group(1) if match else ""
    st = path.stat()
    if _verified.get(path) == (st.st_size, st.st_mtime_ns):
        return
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if not digest.hexdigest().startswith(prefix):
        raise WeightsError(
            f"cached weights '{path}' fail the hash check (sha256 {digest.hexdigest()[:12]}..., "
            f"its name says {prefix}...): delete the file to download it again"
        )
    _verified[path] = (st.st_size, st.st_mtime_ns)


def fetch_imagenet(url: str | None = None, map_location: str | torch.device = "cpu") -> dict:
    """A torchvision ImageNet state dict (default `imagenet_url()`, ResNet-50), downloaded once.

    `torch.hub.load_state_dict_from_url(url, check_hash=True, weights_only=True)`: the first
    call downloads into torch's hub cache ($TORCH_HOME/hub/checkpoints) and checks the sha256
    prefix in the file name; later calls read the cache, after `check_cached_hash`. Offline
    machines give `model.init` a local copy of the file instead. WeightsError (one line).
    """
    url = url or imagenet_url()
    cached = hub_path(url)
    if not torch.hub.HASH_REGEX.search(cached.name):
        raise WeightsError(
            f"{url}: the file name carries no sha256 prefix (<name>-<hex>.<ext>) to check it by"
        )
    if cached.is_file():
        check_cached_hash(cached)
    try:
        state = torch.hub.load_state_dict_from_url(
            url, map_location=map_location, check_hash=True, weights_only=True
        )
    except (URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise WeightsError(
            f"cannot download {url} ({reason}); offline, set model.init to a local copy"
        ) from None
    except Exception as exc:  # noqa: BLE001 - a bad hash or an unreadable file: one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"ImageNet weights {url}: {first}") from None
    if cached.is_file():
        st = cached.stat()  # just downloaded and checked by torch.hub
        _verified.setdefault(cached, (st.st_size, st.st_mtime_ns))
    return state


def load_file(path: str | Path, map_location: str | torch.device = "cpu") -> object:
    """`torch.load(path, weights_only=True)`: no pickled code runs. WeightsError (one line).

    `path` "imagenet" is torchvision's ImageNet ResNet-50 from torch's hub cache
    (`fetch_imagenet`); "./imagenet" is a local file of that name.
    """
    if isinstance(path, str) and path == IMAGENET:
        return fetch_imagenet(map_location=map_location)
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint '{path}' not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure becomes one line
        raise WeightsError(f"cannot read checkpoint '{path}': {load_reason(exc)}") from None


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def load_reason(exc: BaseException) -> str:
    """torch.load's actual reason for failing, in one line of plain text.

    A weights-only failure opens with paragraphs about PyTorch 2.6's defaults (with terminal
    colour codes); the reason follows "WeightsUnpickler error:", e.g. "Unsupported global: GLOBAL
    io.open ..." -> "unsupported global io.open: not a weights file".
    """
    text = ANSI.sub("", str(exc))
    _, marker, rest = text.partition("WeightsUnpickler error:")
    if marker:
        lines = [line.strip() for line in rest.splitlines() if line.strip()]
        reason = lines[0] if lines else "unsupported content"
        found = re.match(r"Unsupported global: GLOBAL (\S+)", reason)
        if found:
            return f"unsupported global {found.group(1)}: not a weights file"
        found = re.match(r"Unsupported operand (\d+)", reason)
        if found:
            return f"unsupported pickle operand {found.group(1)}: not a weights file"
        return reason.rstrip(".")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def describe(obj: object) -> str:
    """What a loaded object is, for 'holds ..., not a state dict' errors."""
    if isinstance(obj, torch.Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, dict):
        bad = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
        return f"a dict whose entry {bad!r} is of type {type(obj[bad]).__name__}"
    if isinstance(obj, list | tuple):
        return f"a {type(obj).__name__} of {len(obj)} items"
    return f"a {type(obj).__name__}"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Model weights of `path`: a bare state dict, or one under "model" / "state_dict".

    Prefixes are stripped; anything but a dict of tensors is a WeightsError.
    """
    obj = load_file(path)
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"'{path}' holds {describe(obj)}, not a state dict of tensors")
    return strip_prefixes(obj)


def adapt_input_conv(weight: torch.Tensor, in_channels: int, rule: str = "authors") -> torch.Tensor:
    """conv1 filters (O, 3, k, k) of an RGB network -> (O, in_channels, k, k) for a flow stack.

    "authors": mean of the three RGB filters replicated to every channel, no rescaling
    (feichtenhofer/st-resnet, base_streams/cnn_ucf101_temporal.m). "timm": R, G, B cycled over
    the channels and scaled by 3 / in_channels (timm's `adapt_input_conv`).
    """
    if weight.ndim != 4 or weight.shape[1] != 3:
        raise ValueError(f"expected RGB conv filters (O, 3, k, k), got {tuple(weight.shape)}")
    if rule == "authors":
        return weight.mean(dim=1, keepdim=True).expand(-1, in_channels, -1, -1).clone()
    if rule == "timm":
        repeat = math.ceil(in_channels / 3)
        return weight.repeat(1, repeat, 1, 1)[:, :in_channels] * (3.0 / in_channels)
    raise ValueError(f"conv1 rule must be one of {CONV1_RULES}, got {rule!r}")


def inflate_temporal(weight: torch.Tensor, kernel: int = 3) -> torch.Tensor:
    """Eq. 5: a 2D 1x1 filter (O, I, 1, 1) -> temporal (O, I, T', 1, 1) with w / T' at every t.

    On a clip constant over time the inflated filter sums to the 2D one: the network starts
    as the image network it was made from and learns temporal structure from there.
    """
    if weight.ndim != 4 or weight.shape[2:] != (1, 1):
        raise ValueError(f"expected 1x1 conv filters (O, I, 1, 1), got {tuple(weight.shape)}")
    return (weight / kernel).unsqueeze(2).expand(-1, -1, kernel, -1, -1).clone()


def adapt_tensor(value: torch.Tensor, want: torch.Size, conv1_init: str) -> torch.Tensor | None:
    """`value` reshaped to the target shape `want` by a known rule, or None if none applies."""
    if value.shape == want:
        return value
    if value.ndim == 4 and len(want) == 4 and value.shape[1] == 3 and want[1] != 3:
        if (value.shape[0], *value.shape[2:]) == (want[0], *want[2:]):
            return adapt_input_conv(value, want[1], conv1_init)
    if value.ndim == 4 and len(want) == 5 and value.shape[2:] == (1, 1):
        if value.shape[:2] == want[:2] and want[3:] == (1, 1):
            return inflate_temporal(value, want[2])
    if value.ndim == 4 and len(want) == 5 and value.shape[:2] == want[:2]:
        if want[3:] == value.shape[2:]:  # a 3D ResNet's t x k x k conv (strnet.resnet3d)
            return inflate_kernel(value, want[2])
    return None


def inflate_kernel(weight: torch.Tensor, depth: int) -> torch.Tensor:
    """I3D inflation (Carreira and Zisserman 2017): a 2D filter (O, I, k, k) repeated `depth`
    times over time and divided by `depth`, (O, I, depth, k, k); on a clip constant over time
    the 3D conv then gives the 2D conv's output (eq. 5's rule for any kernel)."""
    return (weight / depth).unsqueeze(2).expand(-1, -1, depth, -1, -1).clone()


@dataclass
class LoadReport:
    """What `load_pretrained` did: keys copied, keys adapted (conv1, eq. 5), keys left out."""

    loaded: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"{len(self.loaded)} tensors loaded ({len(self.adapted)} adapted), "
            f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, "
            f"{len(self.mismatched)} mismatched"
        )


def is_head_key(key: str) -> bool:
    """Whether `key` is a classifier parameter (`fc.weight`, `appearance.fc.bias`, ...)."""
    return key in HEAD_KEYS or key.endswith(tuple(f".{k}" for k in HEAD_KEYS))


def _listing(name: str, keys: list[str], limit: int = 4) -> str:
    more = f", ... {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{len(keys)} {name} ({', '.join(keys[:limit])}{more})"


def load_pretrained(
    module: nn.Module,
    source: str | Path | dict,
    *,
    conv1_init: str = "authors",
    new_head: bool = True,
) -> LoadReport:
    """Load a torchvision-format state dict (a file or a dict) into `module`, adapting shapes.

    RGB conv1 filters meet a flow stack by `adapt_input_conv`, 2D 1x1 filters meet temporal
    convs by `inflate_temporal`. With `new_head`, a classifier of another class count is left
    at its initialisation; so do the keys a module lists in `fresh_keys()` (STM-ResNet's new
    temporal convs, identity-initialised, which no 2D checkpoint holds; a layer that fusion by
    concatenation widened), and keys of the layers a module lists in `dropped_layers` (a fusion
    tower truncated after the fusion point) are skipped. Any other missing,
    unexpected or mismatched key raises WeightsError naming them, and nothing is loaded.
    """
    if (
        isinstance(source, str)
        and source == IMAGENET
        and getattr(module, "backbone", "") == "vgg16"
    ):
        url = os.environ.get(IMAGENET_URL_ENV) or VGG16_URL
        source = vgg16_from_torchvision(strip_prefixes(fetch_imagenet(url)))
        where = "imagenet (VGG-16)"
    elif isinstance(source, str) and source == IMAGENET:
        depth = resnet_depth(module)
        if depth is None:
            raise WeightsError(
                f"imagenet: torchvision's ImageNet files are ResNets of 18-152 layers and "
                f"VGG-16, and {type(module).__name__} ({getattr(module, 'backbone', '')}) is "
                "neither; give model.init a local weights file"
            )
        source = strip_prefixes(fetch_imagenet(imagenet_url(depth)))
        where = f"imagenet (ResNet-{depth})"
    else:
        where = "state dict" if isinstance(source, dict) else f"'{source}'"
    state = strip_prefixes(source) if isinstance(source, dict) else read_state_dict(source)
    target = module.state_dict()
    report, usable = LoadReport(), {}
    dropped = tuple(f"{name}." for name in getattr(module, "dropped_layers", ()))
    for key, value in state.items():
        if key not in target:
            if not key.startswith(dropped):  # not a layer a fusion network truncated away
                report.unexpected.append(key)
            continue
        fitted = adapt_tensor(value, target[key].shape, conv1_init)
        if fitted is None:
            report.mismatched.append(f"{key} {tuple(value.shape)}->{tuple(target[key].shape)}")
            continue
        usable[key] = fitted.to(target[key].dtype)
        report.loaded.append(key)
        if fitted is not value:
            report.adapted.append(key)
    report.missing = [k for k in target if k not in usable]
    fresh = set(module.fresh_keys()) if hasattr(module, "fresh_keys") else set()
    bad_missing = [
        k
        for k in report.missing
        if not (new_head and is_head_key(k)) and not k.endswith(OPTIONAL_KEYS) and k not in fresh
    ]
    bad_mismatch = [
        m
        for m in report.mismatched
        if not (new_head and is_head_key(m.split()[0])) and m.split()[0] not in fresh
    ]
    if bad_missing or report.unexpected or bad_mismatch:
        parts = [
            _listing(name, keys)
            for name, keys in (
                ("missing", bad_missing),
                ("unexpected", report.unexpected),
                ("mismatched", bad_mismatch),
            )
            if keys
        ]
        raise WeightsError(f"{where} does not fit {type(module).__name__}: {'; '.join(parts)}")
    module.load_state_dict(usable, strict=False)
    return report
