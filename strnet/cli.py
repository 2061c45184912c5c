"""The `strnet` command line: click options and one-line errors over strnet's library functions.

The library modules (train, evaluate, predict, summary) take plain arguments and raise plain
exceptions; only this module knows click, turning those into `Error: ...` lines and exit codes.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import click
import torch.distributed as dist
from tqdm import tqdm

from flowprep.cli import DeviceName
from flowprep.manifest import ManifestError
from strnet import __version__
from strnet.checkpoint import CheckpointError
from strnet.config import ConfigError, load_config, tomllib
from strnet.evaluate import evaluate, mean_over_splits
from strnet.models import MODEL_NAMES, is_3d
from strnet.predict import EXIT_SOME_FAILED, Prediction, Predictor, predict, summary_line
from strnet.runtime import PROTOCOLS, DeviceError
from strnet.scores import check_name, default_name
from strnet.summary import SIZES_3D, summarize
from strnet.train import TrainingError, show_warning_line, train
from strnet.weights import WeightsError


class DeviceUnavailable(click.ClickException):
    """A device asked for that this machine does not have: a usage error, exit status 2."""

    exit_code = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="strnet")
def main() -> None:
    """Train, evaluate, summarise and run two-stream ResNets, ST-ResNet(*), STM-ResNet, the
    Two-Stream Fusion networks and 3D ResNets."""


# --- train
@click.command("train")
@click.argument("config")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config value, e.g. --set optim.lrs=[0.01,0.001]; repeatable.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue exactly from OUT/checkpoint.pt; refuses a changed batch, learning-rate "
    "schedule or architecture.",
)
@click.option(
    "--force",
    "--overwrite",
    "force",
    is_flag=True,
    help="Replace the run in OUT (its checkpoints, metrics, curves and config are deleted once "
    "the new run has started). --overwrite is the older name.",
)
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False),
    default=None,
    help="Run folder (overrides run.out).",
)
@click.option(
    "--device",
    type=DeviceName(),
    default=None,
    help="Where to train (overrides run.device); cuda without a GPU is a usage error (exit 2).",
)
@click.option(
    "-q", "--quiet", is_flag=True, help="No progress bar: one plain line per run.log_every steps."
)
def train_command(
    config: str, overrides: tuple, resume: bool, force: bool, out: str | None,
    device: str | None, quiet: bool,
):  # fmt: skip
    """Train one phase: CONFIG is a TOML file or a shipped phase (motion, appearance,
    st-resnet, st-resnet-star, fusion, fusion-3d, resnet3d18-kinetics, resnet3d34-kinetics).
    Under torchrun every rank runs this command.

    Exit status: 0 done; 1 a bad config, list, data or checkpoint, a run folder that needs
    --resume or --force, or a --resume that changes the run's settings (one line each); 2 a usage
    error (bad or conflicting options, --device cuda without a GPU).
    """
    if resume and force:
        raise click.UsageError("--resume continues a run and --force replaces it: choose one")
    extra = list(overrides) + ([f"run.out={json.dumps(out)}"] if out else [])
    extra += [f"run.device={json.dumps(device)}"] if device else []
    extra += ["run.progress=false"] if quiet else []
    try:
        cfg = load_config(config, extra)
        with warnings.catch_warnings():
            warnings.showwarning = show_warning_line
            summary = train(cfg, resume=resume, force=force)
    except DeviceError as exc:
        raise DeviceUnavailable(str(exc)) from None
    except (ConfigError, CheckpointError, WeightsError, TrainingError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    except KeyError as exc:
        raise click.ClickException(str(exc.args[0]) if exc.args else "missing key") from None
    except OSError as exc:  # a read-only or full run folder, an unreadable list
        where = f"{exc.filename}: " if exc.filename else ""
        raise click.ClickException(f"{where}{exc.strerror or exc}") from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(json.dumps(summary))


# --- eval
@click.command("eval")
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option(
    "--split",
    "splits",
    type=int,
    multiple=True,
    required=True,
    help="Split N of test_split<N>.txt; one per CHECKPOINT, repeatable.",
)
@click.option(
    "--data",
    "data_root",
    default=None,
    type=click.Path(exists=True),
    help="Frame-folder root or shard directory (not needed to fuse saved .npz scores).",
)
@click.option(
    "--protocol",
    type=click.Choice(PROTOCOLS),
    default="paper",
    show_default=True,
    help="paper: 25 chunks + flips on whole frames; center: one centre crop. 3D ResNets: "
    "paper = every non-overlapping 16-frame window, centre crop, probabilities averaged; "
    "center = the middle window.",
)
@click.option(
    "--test-chunks",
    type=int,
    default=25,
    show_default=True,
    help="Chunks sampled evenly per video.",
)
@click.option("--test-list", default="", help="List file instead of DATA/test_split<N>.txt.")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder for NAME_split<N>.json, NAME_split<N>_confusion.png and NAME_split<N>_scores.npz.",
)
@click.option(
    "--name",
    default=None,
    help="Output name (letters, digits, ._+-); default: the run folder's name, for --fuse "
    "the names joined by +.",
)
@click.option(
    "--device",
    type=DeviceName(),
    default="auto",
    show_default=True,
    help="Where to run the model.",
)
@click.option(
    "-j", "--jobs", type=int, default=0, show_default=True, help="DataLoader worker processes."
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option(
    "--fuse",
    is_flag=True,
    help="Fuse all CHECKPOINTS (e.g. appearance + motion phases, or their saved _scores.npz) "
    "on one --split by averaging their scores before softmax.",
)
def eval_command(
    checkpoints, splits, data_root, protocol, test_chunks, test_list, out, name, device, jobs,
    quiet, fuse,
):  # fmt: skip
    """Evaluate CHECKPOINT(s) video by video; with three splits also print the mean.

    A CHECKPOINT may also be the _scores.npz of an earlier eval: saved scores are fused without
    data or model (e.g. `strnet eval a_split1_scores.npz b_split1_scores.npz --fuse --split 1`).
    """
    runs = check_eval_args(checkpoints, splits, data_root, out, name, fuse)
    results = []
    bar = tqdm(unit="video", disable=True if quiet else None, dynamic_ncols=True)  # a terminal's
    try:
        for ckpt, split in runs:
            r = evaluate(
                ckpt, data_root, split, protocol=protocol, test_chunks=test_chunks, out=out,
                device=device, test_list=test_list, num_workers=jobs, name=name,
                on_start=lambda n: bar.reset(total=n), on_video=bar.update,
            )  # fmt: skip
            bar.clear()
            results.append(r)
            click.echo(
                f"split {split}: top-1 {r['top1']:.4f}  top-5 {r['top5']:.4f}  "
                f"mean class {r['mean_class_accuracy']:.4f}  ({r['num_videos']} videos)"
            )
    except DeviceError as exc:
        raise DeviceUnavailable(str(exc)) from None
    except (ConfigError, WeightsError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    except KeyError as exc:
        raise click.ClickException(str(exc.args[0]) if exc.args else "missing key") from None
    finally:
        bar.close()
    if len(results) > 1:
        m = mean_over_splits(results)
        click.echo(f"mean over splits {m['splits']}: top-1 {m['top1']:.4f}  top-5 {m['top5']:.4f}")


def check_eval_args(checkpoints, splits, data_root, out, name, fuse) -> list[tuple]:
    """The (inputs, split) evaluations of `strnet eval`; usage errors before any work starts.

    Two evaluations writing the same `<name>_split<N>` files into `--out` are refused.
    """
    if fuse and len(splits) != 1:
        raise click.UsageError("--fuse evaluates all CHECKPOINTS together: give one --split")
    if not fuse and len(checkpoints) != len(splits):
        raise click.UsageError("give one --split per CHECKPOINT")
    if data_root is None and not all(str(c).endswith(".npz") for c in checkpoints):
        raise click.UsageError("--data is needed to evaluate checkpoints (only .npz scores fuse)")
    try:
        if name is not None:
            check_name(name)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    runs = [(list(checkpoints), splits[0])] if fuse else list(zip(checkpoints, splits, strict=True))
    if out is not None and not fuse:
        seen: dict[str, object] = {}
        for inputs, split in runs:
            stem = f"{name or default_name(inputs)}_split{split}"
            if stem in seen:
                raise click.UsageError(
                    f"{seen[stem]} and {inputs} would both write {stem}.json: evaluate them "
                    "separately with --name"
                )
            seen[stem] = inputs
    return runs


# --- predict
@click.command("predict")
@click.argument("videos", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--checkpoint",
    "checkpoints",
    multiple=True,
    required=True,
    type=click.Path(dir_okay=False),
    help="A strnet training checkpoint; give two stream checkpoints (appearance, motion) to "
    "fuse them as `strnet eval --fuse` does.",
)
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True,
              help="Classes printed per video.")  # fmt: skip
@click.option(
    "--protocol",
    type=click.Choice(PROTOCOLS),
    default="paper",
    show_default=True,
    help="paper: 25 chunks + flips on whole frames; center: one centre crop per chunk.",
)
@click.option("--test-chunks", type=click.IntRange(min=1), default=25, show_default=True,
              help="Chunks sampled evenly per video.")  # fmt: skip
@click.option(
    "--device",
    type=DeviceName(),
    default="auto",
    show_default=True,
    help="Where flow and the model run; auto picks CUDA when present.",
)
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write one JSON line per video: top-k, fused and per-stream scores before "
    "softmax, seconds per stage (or the error).",
)
@click.option(
    "--short-side",
    type=click.IntRange(min=0),
    default=None,
    help="Resize as `flowprep extract --short-side` [default: the checkpoint's extract "
    "settings, else 256].",
)
@click.option(
    "--quality",
    "jpeg_quality",
    type=click.IntRange(1, 100),
    default=None,
    help="JPEG quality extract stored frames and flow with [default: the checkpoint's, else 95].",
)
@click.option(
    "--flow-bound",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Flow clip bound in pixels before quantizing [default: the checkpoint's, else 20].",
)
@click.option(
    "--flow-backend",
    type=click.Choice(["torch", "opencv"]),
    default=None,
    help="TV-L1 implementation [default: the checkpoint's, else torch].",
)
@click.option(
    "--flow-compile",
    type=click.Choice(["auto", "on", "off"]),
    default="auto",
    show_default=True,
    help="torch.compile TV-L1 as `flowprep extract --flow-compile` (auto: 160x120 and up).",
)
def predict_command(
    videos, checkpoints, top, protocol, test_chunks, device, json_out, short_side, jpeg_quality,
    flow_bound, flow_backend, flow_compile,
):  # fmt: skip
    """Print the top classes of each VIDEO (or every video in a folder) with probabilities.

    Each video is decoded, resized, its TV-L1 flow computed and quantized in memory exactly as
    `flowprep extract` stores it, and scored with the test protocol of `strnet eval`; two
    checkpoints are fused by averaging their scores before softmax. Class names come from the
    checkpoint. A video that cannot be read is reported in one line and the rest go on.

    Exit status: 0 when every video was predicted, 3 when some failed, 1 for an unusable
    checkpoint or folder, 2 for bad options.
    """
    flags = {"short_side": short_side, "jpeg_quality": jpeg_quality, "flow_bound": flow_bound,
             "flow_backend": flow_backend}  # fmt: skip
    compile_ = {"on": True, "off": False}.get(flow_compile, "auto")
    counts = {"done": 0, "failed": 0}
    try:
        predictor = Predictor(list(checkpoints), protocol=protocol, test_chunks=test_chunks,
                              device=device, flags=flags, flow_compile=compile_)  # fmt: skip
        for note in predictor.notes:
            click.echo(note, err=True)

        def report(result: Prediction) -> None:
            counts[result.status] += 1
            if result.status == "done":
                click.echo(summary_line(result, predictor.classes, top))
            else:
                click.echo(f"failed: {result.video}: {result.reason}", err=True)

        predict(predictor, list(videos), top=top, json_out=json_out, on_result=report)
    except DeviceError as exc:
        raise DeviceUnavailable(str(exc)) from None
    except (ConfigError, WeightsError, ManifestError) as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:  # the --json file
        raise click.ClickException(f"{exc.filename or json_out}: {exc.strerror or exc}") from None
    click.echo(f"{counts['done']} predicted, {counts['failed']} failed", err=True)
    if counts["failed"]:
        sys.exit(EXIT_SOME_FAILED)


# --- summary
def defaults_3d(values: dict) -> dict:
    """The summary options of a 3D ResNet: sizes left at their 2D defaults become Sec. 3.1's
    (16 frames of 112 x 112, 400 classes)."""
    ctx = click.get_current_context()
    for key, value in SIZES_3D.items():
        if ctx.get_parameter_source(key) == click.core.ParameterSource.DEFAULT:
            values[key] = value
    return values


def model_arguments_of(items: tuple[str, ...]) -> dict:
    """`--set key=value` items as create_model keyword arguments (values read as TOML, else
    strings: `truncate=true`, `fuse_at=relu5`)."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise click.UsageError(f"--set {item!r} is not key=value")
        try:
            out[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = raw
    return out


@click.command("summary")
@click.argument("model", type=click.Choice(MODEL_NAMES))
@click.option("--chunks", type=int, default=11, show_default=True,
              help="T temporal chunks (3D ResNets: frames of the clip, default 16 x 112 x 112, "
              "400 classes).")  # fmt: skip
@click.option("--height", type=int, default=224, show_default=True, help="Input height.")
@click.option("--width", "frame_width", type=int, default=224, show_default=True,
              help="Input width.")  # fmt: skip
@click.option("--num-classes", type=int, default=101, show_default=True, help="K classes.")
@click.option("--base-width", type=int, default=64, show_default=True,
              help="Channels of conv1 (64 in the paper).")  # fmt: skip
@click.option("--flow-stack", type=int, default=10, show_default=True,
              help="L flows per motion input (2L channels).")  # fmt: skip
@click.option("--in-channels", type=int, default=3, show_default=True,
              help="Input channels of a single-stream model.")  # fmt: skip
@click.option(
    "--stride-in-1x1",
    is_flag=True,
    help="Stride on the first 1x1 conv (ResNet v1, Table 1) instead of the 3x3 (v1.5).",
)
@click.option("--set", "model_sets", multiple=True, metavar="KEY=VALUE",
              help="Another create_model argument, e.g. --set fusion=conv --set fuse_at=relu5 "
              "--set truncate=true (fusion_* models); repeatable.")  # fmt: skip
def summary_command(model, chunks, height, frame_width, num_classes, base_width, flow_stack,
                    in_channels, stride_in_1x1, model_sets):  # fmt: skip
    """Print MODEL's parameters, multiply-adds and stage output sizes (W x H x T, C)."""
    if is_3d(model):  # a 3D ResNet: --chunks is its clip's frames (default 16 x 112 x 112)
        sizes = defaults_3d(dict(chunks=chunks, height=height, frame_width=frame_width,
                                 num_classes=num_classes))  # fmt: skip
        chunks, height, frame_width, num_classes = sizes.values()
    if min(chunks, height, frame_width, num_classes, base_width, flow_stack, in_channels) < 1:
        raise click.UsageError("sizes and counts must be positive")
    try:
        s = summarize(
            model, chunks=chunks, height=height, width=frame_width, num_classes=num_classes,
            base_width=base_width, flow_stack=flow_stack, in_channels=in_channels,
            stride_in_1x1=stride_in_1x1, model_kw=model_arguments_of(model_sets),
        )  # fmt: skip
    except (ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc).splitlines()[0]) from None
    click.echo(f"{s['name']}: {s['input']}")
    per_stream = s["stream_parameters"]
    split = ""
    if len(per_stream) > 1:
        split = " (" + ", ".join(f"{k} {v:,}" for k, v in per_stream.items()) + ")"
    click.echo(f"parameters: {s['parameters']:,}{split}")
    click.echo(f"multiply-adds per clip: {s['macs'] / 1e9:.2f} G")
    click.echo(f"{'stream':<11} {'stage':<8} output (W x H x T, C)")
    for r in s["rows"]:
        click.echo(f"{r.stream:<11} {r.stage:<8} {r.size()}")


main.add_command(train_command)
main.add_command(eval_command)
main.add_command(summary_command)
main.add_command(predict_command)
