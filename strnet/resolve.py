"""What a run takes from its data and its init checkpoints before its model is built.

Classes: K = 1 + the largest label of the split's train and test lists, names from the videos'
metadata (`meta["label"]` where `meta["label_index"]` agrees), else the index as text.
Architecture: `model.width` (0) and `data.flow_stack` (unless set) come from a strnet training
checkpoint named by `model.init*` (or, on `--resume`, the run's own); an explicit value that
differs is a one-line error naming the field, both values and the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from strnet.config import ConfigError, TrainConfig, is_set
from strnet.models import is_two_stream
from strnet.runtime import list_path, split_items
from strnet.weights import load_file

INIT_KEYS = ("init", "init_appearance", "init_motion")
DEFAULT_WIDTH = 64  # model.width when neither the user nor a checkpoint sets it (the paper's)


def label_lists(cfg: TrainConfig) -> list[tuple[Path, list[tuple[str, int]]]]:
    """(path, items) of the split's train list and, when the file exists, its test list."""
    lists = [(list_path(cfg, "train"), split_items(cfg, "train"))]
    if list_path(cfg, "test").is_file():
        lists.append((list_path(cfg, "test"), split_items(cfg, "test")))
    return lists


def data_classes(cfg: TrainConfig, reader) -> list[str]:
    """Class names 0..K-1 of the split's lists; a set `model.num_classes` must equal K."""
    lists = label_lists(cfg)
    k, where = 0, lists[0][0]
    for path, items in lists:
        for vid, label in items:
            if label < 0:
                raise ConfigError(f"label {label} of {vid!r} in {path} is negative")
            if label + 1 > k:
                k, where = label + 1, path
    if k == 0:
        raise ConfigError(f"train list {str(lists[0][0])!r} holds no videos")
    n = cfg.model.num_classes
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


def strnet_config(path: str | Path) -> dict | None:
    """The stored config of a strnet training checkpoint; None for a plain state dict."""
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


def inherited_fields(cfg: TrainConfig, source: dict, key: str) -> dict[str, int]:
    """Dotted field -> value of the architecture settings a checkpoint's config passes on.

    The flow stack only where both the run and the checkpoint's stream see flow.
    """
    out = {"model.width": int(source["model"]["width"])}
    if cfg.data.use_flow and source["data"]["use_flow"] and key != "init_appearance":
        out["data.flow_stack"] = int(source["data"]["flow_stack"])
    return out


def inherit_architecture(
    cfg: TrainConfig, num_classes: int, resume_path: Path | None = None
) -> list[str]:
    """Set `model.width` / `data.flow_stack` from strnet init checkpoints unless set; notes.

    The data's `num_classes` must match a checkpoint's unless `model.num_classes` is set (then
    the classifier starts anew: transfer to another dataset) and never differs on resume.
    """
    explicit = {"model.width": cfg.model.width != 0}
    explicit["data.flow_stack"] = is_set(cfg, "data.flow_stack")
    explicit_k, got, notes = cfg.model.num_classes != 0, {}, []
    for init_key, where, path in init_sources(cfg, resume_path):
        source = strnet_config(path)
        if source is None:
            continue  # ImageNet or another plain state dict: nothing to inherit
        for key, value in inherited_fields(cfg, source, init_key).items():
            section, name = key.split(".")
            current = getattr(getattr(cfg, section), name)
            if key in got and got[key][0] != value:
                raise ConfigError(f"{key}: {got[key][1]} has {got[key][0]} but {where} has {value}")
            if explicit[key] and current != value:
                raise ConfigError(f"{key} is {current} but {where} has {value}")
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


def resolve_run(cfg: TrainConfig, reader, resume_path: Path | None = None) -> tuple[list, list]:
    """Fill `cfg` in place from the data and init checkpoints: (class names, note lines)."""
    classes = data_classes(cfg, reader)
    notes = inherit_architecture(cfg, len(classes), resume_path)
    cfg.model.num_classes = len(classes)
    return classes, notes
