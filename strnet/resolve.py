"""What a run takes from its data and its init checkpoints before its model is built.

Classes: K = 1 + the largest label of the split's train and test lists, names from the videos'
metadata (`meta["label"]` where `meta["label_index"]` agrees), else the index as text.
Architecture: `model.width` (0) and `data.flow_stack` (unless set) come from a strnet training
checkpoint named by `model.init*` (or, on `--resume`, the run's own); an explicit value that
differs is a one-line error naming the field, both values and the checkpoint.
Resume: the run's checkpoint fixes the network, the SGD batch and the learning-rate schedule
(`RESUME_KEYS`); a changed one is such a line too, and so is a list label its classifier lacks.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from strnet.config import (
    ConfigError,
    ModelConfig,
    TrainConfig,
    config_from_dict,
    is_set,
    to_dict,
)
from strnet.models import is_two_stream
from strnet.runtime import list_line, list_path, split_items
from strnet.weights import IMAGENET, load_file

INIT_KEYS = ("init", "init_appearance", "init_motion")
DEFAULT_WIDTH = 64  # model.width when neither the user nor a checkpoint sets it (the paper's)


def label_lists(cfg: TrainConfig) -> list[tuple[Path, list[tuple[str, int]]]]:
    """(path, items) of the split's train list and, when the file exists, its test list."""
    lists = [(list_path(cfg, "train"), split_items(cfg, "train"))]
    if list_path(cfg, "test").is_file():
        lists.append((list_path(cfg, "test"), split_items(cfg, "test")))
    return lists


def data_classes(cfg: TrainConfig, reader, expected: tuple[int, str] | None = None) -> list[str]:
    """Class names 0..K-1 of the split's lists; a set `model.num_classes` must equal K.

    `expected` is (K, where) of a checkpoint the run must keep its classifier from (`--resume`)
    when `model.num_classes` is not set. A label out of that range is one line naming the list
    file, the line and the label.
    """
    lists = label_lists(cfg)
    k, where = 0, lists[0][0]
    for path, items in lists:
        for vid, label in items:
            if label < 0:
                raise ConfigError(f"{list_line(path, vid)}: label {label} of {vid!r} is negative")
            if label + 1 > k:
                k, where = label + 1, path
    if k == 0:
        raise ConfigError(f"train list {str(lists[0][0])!r} holds no videos")
    n = cfg.model.num_classes
    if n:
        expected = (n, f"model.num_classes is {n}")
    elif expected is not None:
        expected = (expected[0], f"{expected[1]} has {expected[0]} classes")
    if expected is not None and k > expected[0]:
        m, what = expected
        path, vid, label = next(
            (path, vid, label) for path, items in lists for vid, label in items if label >= m
        )
        raise ConfigError(
            f"{list_line(path, vid)}: label {label} of {vid!r} is out of range: {what} "
            f"(labels 0-{m - 1})"
        )
    if n and n != k:
        raise ConfigError(
            f"model.num_classes is {n} but the data has {k} classes (labels 0-{k - 1} in {where})"
        )
    return class_names(reader, [item for _, items in lists for item in items], k)


def class_names(reader, items: list[tuple[str, int]], num_classes: int) -> list[str]:
    """Name of each label from the metadata of its first video in `items`, else str(label).

    One metadata read per class, so this stays cheap on large datasets.
    """
    names: list[str | None] = [None] * num_classes
    tried: set[int] = set()
    for vid, label in items:
        if label in tried or label >= num_classes or vid not in reader:
            continue
        tried.add(label)
        meta = getattr(reader[vid], "meta", None) or {}
        if meta.get("label") is not None and meta.get("label_index") == label:
            names[label] = str(meta["label"])
    return [name if name is not None else str(i) for i, name in enumerate(names)]


def data_extract_settings(reader, items: list[tuple[str, int]]) -> tuple[dict | None, list[str]]:
    """The extract settings (`meta.json` "settings") the training videos were prepared with.

    Read from the first video of each class, as `class_names` reads names; stored in checkpoints
    so `strnet predict` prepares new videos the same way. Videos that disagree, or carry none,
    give None and a note: predict then takes its options.
    """
    seen: dict[str, dict] = {}
    tried: set[int] = set()
    for vid, label in items:
        if label in tried or vid not in reader:
            continue
        tried.add(label)
        settings = (getattr(reader[vid], "meta", None) or {}).get("settings")
        if not isinstance(settings, dict):
            return None, [f"video {vid!r} records no extract settings; none stored for predict"]
        seen[json.dumps(settings, sort_keys=True)] = settings
    if len(seen) > 1:
        return None, ["training videos were extracted with different settings; none stored"]
    return next(iter(seen.values()), None), []


def strnet_config(path: str | Path) -> dict | None:
    """The stored config of a strnet training checkpoint; None for a plain state dict."""
    if str(path) == IMAGENET:  # torchvision's file: nothing to inherit, nothing to download
        return None
    obj = load_file(path)
    if isinstance(obj, dict) and isinstance(obj.get("config"), dict) and "model" in obj:
        return obj["config"]
    return None


def init_sources(cfg: TrainConfig, resume_path: Path | None) -> list[tuple[str, str, str]]:
    """(key, description, path) of the checkpoints a run's architecture comes from."""
    if resume_path is not None:
        return [("resume", f"'{resume_path}' (the run's checkpoint)", str(resume_path))]
    m = cfg.model
    if not is_two_stream(m.name) and (m.init_appearance or m.init_motion):
        raise ConfigError("model.init_appearance/init_motion need a two-stream model")
    keys = INIT_KEYS if is_two_stream(m.name) else INIT_KEYS[:1]
    return [(k, f"'{getattr(m, k)}' (model.{k})", getattr(m, k)) for k in keys if getattr(m, k)]


def inherited_fields(cfg: TrainConfig, source: dict, key: str) -> dict[str, int | str]:
    """Dotted field -> value of the architecture settings a checkpoint's config passes on.

    The flow stack and its offset only where both the run and the checkpoint's stream see flow
    (a motion stream's filters mean one alignment of stack and frame; a config stored before the
    offset existed was trained with 0).
    """
    out: dict[str, int | str] = {"model.width": int(source["model"]["width"])}
    if cfg.data.use_flow and source["data"]["use_flow"] and key != "init_appearance":
        out["data.flow_stack"] = int(source["data"]["flow_stack"])
        out["data.flow_offset"] = source["data"].get("flow_offset", 0)
    return out


def inherit_architecture(
    cfg: TrainConfig, num_classes: int, resume_path: Path | None = None, *, loaded=None
) -> list[str]:
    """Set `model.width`, `data.flow_stack` / `flow_offset` from strnet init checkpoints unless set.

    The data's `num_classes` must match a checkpoint's unless `model.num_classes` is set (then
    the classifier starts anew: transfer to another dataset) and never differs on resume.
    `loaded` maps checkpoint paths already read to their stored configs.
    """
    explicit = {"model.width": cfg.model.width != 0}
    explicit["data.flow_stack"] = is_set(cfg, "data.flow_stack")
    explicit["data.flow_offset"] = is_set(cfg, "data.flow_offset")
    explicit_k, got, notes = cfg.model.num_classes != 0, {}, []
    for init_key, where, path in init_sources(cfg, resume_path):
        source = (loaded or {})[path] if path in (loaded or {}) else strnet_config(path)
        if source is None:
            continue  # ImageNet or another plain state dict: nothing to inherit
        for key, value in inherited_fields(cfg, source, init_key).items():
            section, name = key.split(".")
            current = getattr(getattr(cfg, section), name)
            if key in got and got[key][0] != value:
                raise ConfigError(f"{key}: {got[key][1]} has {got[key][0]} but {where} has {value}")
            if explicit[key] and current != value:
                tail = RESUME_HINT if init_key == "resume" else ""
                raise ConfigError(f"{key} is {current} but {where} has {value}{tail}")
            setattr(getattr(cfg, section), name, value)
            got.setdefault(key, (value, where))
        k = int(source["model"]["num_classes"])
        if k != num_classes:
            message = f"model.num_classes: the data has {num_classes} classes but {where} has {k}"
            if resume_path is not None:
                raise ConfigError(message)
            if not explicit_k:
                raise ConfigError(f"{message}; set model.num_classes={num_classes} for a new head")
            notes.append(f"{where}: {k} classes, the data {num_classes}: new classifier")
    cfg.model.width = cfg.model.width or DEFAULT_WIDTH
    return notes


# Settings a resumed run must keep: the network (every [model] setting but those that only pick
# starting weights) and the input it was trained on (streams, flow stack, flow offset), so the
# weights load and mean the same; the SGD batch and the learning-rate schedule (the step counter
# means nothing under another); the momentum and weight decay (the saved optimizer state would
# silently replace new values). Sampling, logging, workers, micro_batch and max_steps may change.
START_ONLY = ("init", "init_appearance", "init_motion", "conv1_init")
RESUME_KEYS = (
    *(f"model.{f.name}" for f in dataclasses.fields(ModelConfig) if f.name not in START_ONLY),
    "data.use_rgb", "data.use_flow", "data.flow_stack", "data.flow_offset",
    "optim.batch_size", "optim.lrs", "optim.iterations", "optim.momentum", "optim.weight_decay",
    "optim.loss",
)  # fmt: skip
RESUME_HINT = "; --resume keeps a run's settings (--force starts it over)"


def effective(values: dict, key: str):
    """The value of dotted `key` in a config dict as the run uses it (None: not stored, unused).

    `model.in_channels` 0 means "from the data" (3, or 2L flow channels); the flow stack and
    offset matter only to a run that reads flow.
    """
    section, name = key.split(".")
    value = values.get(section, {}).get(name)
    if value is None:
        return None
    data, model = values.get("data", {}), values.get("model", {})
    if key in ("data.flow_stack", "data.flow_offset") and not data.get("use_flow", True):
        return None
    if key == "model.in_channels":
        if is_two_stream(str(model.get("name", ""))):
            return None
        if value == 0 and "use_rgb" in data:
            value = 3 if data["use_rgb"] else 2 * int(data.get("flow_stack", 0))
    if isinstance(value, list):
        return [float(v) if isinstance(v, float) else v for v in value]
    return value


def check_resume(cfg: TrainConfig, stored: dict, path: str | Path) -> None:
    """Refuse to resume under changed `RESUME_KEYS`: one line naming the key, both values.

    A key the checkpoint's config lacks (saved by an older strnet) counts as what that version
    did (`config_from_dict`: its legacy value, else the default).
    """
    current = to_dict(cfg)
    try:
        stored = to_dict(config_from_dict(stored))
    except ConfigError:
        pass  # a config this version cannot read: compare the keys both hold
    for key in RESUME_KEYS:
        old, new = effective(stored, key), effective(current, key)
        if old is not None and new is not None and old != new:
            raise ConfigError(
                f"{key} is {new} but '{path}' (the run's checkpoint) has {old}{RESUME_HINT}"
            )


def resolve_run(cfg: TrainConfig, reader, resume_path: Path | None = None) -> tuple[list, list]:
    """Fill `cfg` in place from the data and init checkpoints: (class names, note lines).

    With `resume_path` (the run's own checkpoint) the settings of `RESUME_KEYS` must be the
    checkpoint's, and every label must fit its classifier.
    """
    stored, expected = None, None
    if resume_path is not None:
        stored = strnet_config(resume_path)
        if stored is None:
            raise ConfigError(f"'{resume_path}' is not a strnet training checkpoint")
        where = f"'{resume_path}' (the run's checkpoint)"
        expected = (int(stored["model"]["num_classes"]), where)
    classes = data_classes(cfg, reader, expected)
    loaded = {str(resume_path): stored} if resume_path is not None else None
    notes = inherit_architecture(cfg, len(classes), resume_path, loaded=loaded)
    cfg.model.num_classes = len(classes)
    if stored is not None:
        check_resume(cfg, stored, resume_path)
    return classes, notes
