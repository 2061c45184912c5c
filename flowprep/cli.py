"""The `flowprep` command line: a thin click layer over importable functions.

Each command parses options, calls a function from its own module and reports; no logic lives here.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import time
from pathlib import Path

import click
from tqdm import tqdm

from flowprep import __version__
from flowprep.extract import run_batch
from flowprep.extract_hdf5 import extract_to_shards
from flowprep.flow_service import DEVICE_BATCH, resolve_devices
from flowprep.kinetics import write_missing_list
from flowprep.manifest import (
    ManifestError,
    build_manifest,
    index_folder,
    printable,
    read_manifest,
    write_manifest,
)
from flowprep.ownership import OutputError
from flowprep.reader import ReaderError
from flowprep.resume import VideoResult
from flowprep.settings import MODALITIES, ExtractSettings, RuntimeOptions
from flowprep.shards import ShardError, pack, parse_size
from flowprep.verify import verify
from flowprep.viz import write_panels

EXIT_SOME_FAILED = 3


class DeviceName(click.ParamType):
    """The `--device` option type: auto, cpu, cuda (every visible GPU) or cuda:N."""

    name = "auto|cpu|cuda[:N]"

    def get_metavar(self, param, ctx=None) -> str:  # as written, not upper-cased
        return self.name

    def convert(self, value, param, ctx):
        if isinstance(value, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            return value
        self.fail(f"{value!r} is not one of auto, cpu, cuda or cuda:N", param, ctx)


class TqdmLogHandler(logging.Handler):
    """Writes log records to stderr through tqdm, so they appear above a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(f"flowprep: {record.getMessage()}", file=sys.stderr)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="flowprep")
def main() -> None:
    """Prepare action-recognition videos: manifests, RGB frames, TV-L1 flow, shards."""


@main.command("index")
@click.argument("video_root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "-s",
    "--splits",
    "split_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Folder with the official split files (UCF101 classInd.txt + train/testlist0N.txt, "
    "HMDB51 <class>_test_split<N>.txt, or Kinetics CSVs with youtube_id,time_start,time_end,"
    "label,split). Without it, VIDEO_ROOT is read as one folder per class.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", "ucf101", "hmdb51", "kinetics", "folder"]),
    default="auto",
    show_default=True,
    help="Layout of the split files; auto detects it from --splits.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Manifest to write (JSON lines: video_id, path, label, label_index, splits).",
)
def index_command(video_root: Path, split_dir: Path | None, fmt: str, output: Path) -> None:
    """Write a manifest of the videos under VIDEO_ROOT with their labels and splits.

    Kinetics clips the CSVs list but VIDEO_ROOT lacks are left out and listed in
    OUTPUT's <stem>_missing.txt (`<clip> <csv file:line>`); that is not an error.
    """
    absent: list[str] = []
    try:
        entries = build_manifest(video_root, split_dir, fmt, missing=absent)
    except (ManifestError, OSError, UnicodeDecodeError) as exc:
        raise click.ClickException(str(exc)) from None
    try:
        write_manifest(entries, output)
        absent_list = write_missing_list(output, absent)  # Kinetics clips not downloaded
    except OSError as exc:  # a read-only folder, a full disk
        raise click.ClickException(f"{output}: cannot write ({exc.strerror or exc})") from None
    missing = sum(not (video_root / e.path).exists() for e in entries)
    labels = {e.label for e in entries if e.label is not None}
    click.echo(
        f"indexed {len(entries)} videos in {len(labels)} classes -> {output}"
        + (f" ({missing} listed videos are not under {video_root})" if missing else "")
        + (f"; {len(absent)} listed clips are missing: {absent_list}" if absent_list else "")
    )


def _load_entries(source: Path, video_root: Path | None) -> tuple[list, Path]:
    """Entries and video root from a manifest file or a folder of videos (none: an error)."""
    if source.is_dir():
        try:
            entries = index_folder(source)
        except ManifestError as exc:
            raise click.ClickException(str(exc)) from None
        if not entries:
            raise click.ClickException(f"no videos found in {source}")
        return entries, source
    try:
        entries = read_manifest(source)
        if not entries:
            raise click.ClickException(f"{source}: the manifest lists no videos")
        return entries, (video_root or source.parent)
    except ManifestError as exc:
        raise click.ClickException(str(exc)) from None
    except UnicodeDecodeError:
        raise click.ClickException(
            f"{source}: not a manifest (binary file); pass a manifest "
            "from `flowprep index` or a folder of videos"
        ) from None


@main.command("extract")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Output root: OUT/<video_id>/img_00001.jpg ..., meta.json, failures.jsonl, split lists.",
)
@click.option(
    "--video-root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Root the manifest's paths are relative to (default: the manifest's folder).",
)
@click.option(
    "--modality",
    type=click.Choice(MODALITIES),
    default="rgb",
    show_default=True,
    help="Write RGB frames, optical flow (flow_x/flow_y), or both.",
)
@click.option(
    "--short-side",
    type=click.IntRange(min=0),
    default=256,
    show_default=True,
    help="Resize so the short side has this many pixels (aspect kept); 0 keeps the size.",
)
@click.option(
    "--quality",
    "jpeg_quality",
    type=click.IntRange(1, 100),
    default=95,
    show_default=True,
    help="JPEG quality of the written frames.",
)
@click.option(
    "--flow-backend",
    type=click.Choice(["torch", "opencv"]),
    default="torch",
    show_default=True,
    help="TV-L1 implementation: our batched PyTorch one, or OpenCV's DualTVL1 (CPU reference).",
)
@click.option(
    "--device",
    type=DeviceName(),
    default="auto",
    show_default=True,
    help="Device of the torch flow backend; auto picks CUDA when present (all GPUs), cuda:N one.",
)
@click.option(
    "--flow-bound",
    type=click.FloatRange(min=0, min_open=True),
    default=20.0,
    show_default=True,
    help="Clip flow to +-BOUND pixels before quantizing to JPEG.",
)
@click.option(
    "--flow-format",
    type=click.Choice(["jpeg", "npy"]),
    default="jpeg",
    show_default=True,
    help="jpeg: quantized flow_x/flow_y images; npy: raw float32 flow per frame pair.",
)
@click.option(
    "--flow-batch",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Frame pairs per chunk a video sends for flow (see --device-batch).",
)
@click.option(
    "--flow-compile",
    type=click.Choice(["auto", "on", "off"]),
    default="auto",
    flag_value="on",
    is_flag=False,
    show_default=True,
    help="torch.compile the TV-L1 iterations: 2-3x faster after a one-off compile of a few "
    "seconds per frame size (cached on disk); auto compiles frames of 160x120 and up. Falls "
    "back to eager, with a warning, where torch.compile cannot run. A bare --flow-compile means "
    "on: put it after SOURCE, or it takes SOURCE as its value.",
)
@click.option(
    "--device-batch",
    type=click.IntRange(min=1),
    default=DEVICE_BATCH,
    show_default=True,
    help="Frame pairs per flow call on a device, joined from the chunks of several videos "
    "(GPUs need large batches; on the CPU pairs are solved one cache-sized piece at a time).",
)
@click.option(
    "-j",
    "--jobs",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Videos processed in parallel: joblib processes with --modality rgb or --flow-backend "
    "opencv; with the torch flow backend, decoding threads (at least two per device) that feed "
    "one flow worker per device; Dask workers with --backend dask.",
)
@click.option(
    "--backend",
    type=click.Choice(["local", "dask"]),
    default="local",
    show_default=True,
    help="local: joblib on this machine; dask: the per-video work runs on a Dask cluster.",
)
@click.option(
    "--scheduler",
    help="Dask scheduler address (tcp://host:8786); without it a local cluster "
    "of --jobs workers is started. OUT must be reachable from every worker.",
)
@click.option(
    "--format",
    "out_format",
    type=click.Choice(["folders", "hdf5"]),
    default="folders",
    show_default=True,
    help="folders: OUT/<video_id>/*.jpg; hdf5: OUT/shard_*.h5 + index.json, as `flowprep pack` "
    "writes them (each video is packed as soon as its shard is complete).",
)
@click.option(
    "--shard-size",
    default="4GB",
    show_default=True,
    help="With --format hdf5: target bytes per shard (4GB, 500MB).",
)
@click.option("--force", is_flag=True, help="Redo every video, even those already done.")
@click.option("--strict", is_flag=True, help="Stop at the first video that fails.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def extract_command(
    source: Path,
    out: Path,
    video_root: Path | None,
    modality: str,
    short_side: int,
    jpeg_quality: int,
    flow_backend: str,
    device: str,
    flow_bound: float,
    flow_format: str,
    flow_batch: int,
    flow_compile: str,
    device_batch: int,
    jobs: int,
    backend: str,
    scheduler: str | None,
    out_format: str,
    shard_size: str,
    force: bool,
    strict: bool,
    quiet: bool,
) -> None:
    """Extract RGB frames (and TV-L1 flow) of every video in SOURCE into OUT.

    SOURCE is a manifest from `flowprep index` or a folder of videos (one folder per class gives
    labels). Finished videos are skipped on a rerun (resume); a video whose settings changed, or
    that a killed run left half-written, is redone. Each video that cannot be read is listed with
    its reason in OUT/failures.jsonl and the batch goes on.

    Exit status: 0 when every video succeeded, 3 when some failed (or --strict stopped at the
    first failure), 1 for an unusable SOURCE (a bad manifest, an unreadable folder, video ids
    where one is a folder of another) or an OUT that another run is writing, that holds a
    planted symlink, or that cannot be written (read-only, no space left), 2 for bad options.
    """
    entries, root = _load_entries(source, video_root)
    try:
        settings = ExtractSettings(
            short_side, jpeg_quality, modality, flow_backend, flow_bound, flow_format
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        shard_bytes = parse_size(shard_size)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--shard-size") from None
    if settings.wants_flow and flow_backend == "torch" and device.startswith("cuda"):
        try:
            resolve_devices(device)  # a GPU that is not there is a usage error, not a traceback
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else 0
    options = RuntimeOptions(
        device=device,
        flow_batch=flow_batch,
        flow_compile={"on": True, "off": False}.get(flow_compile, "auto"),
        device_batch=device_batch,
        threads=threads,
    )
    bar = tqdm(total=len(entries), unit="video", disable=quiet, dynamic_ncols=True)
    notes = TqdmLogHandler()  # library notes (a first compile) above the bar, not through it
    start, frames = time.monotonic(), 0

    def report(result: VideoResult) -> None:
        nonlocal frames
        frames += result.num_frames if result.status == "done" else 0
        bar.update(1)
        bar.set_postfix_str(
            f"{frames / max(time.monotonic() - start, 1e-9):.0f} frames/s", refresh=False
        )
        if result.status == "failed":
            bar.write(f"failed: {printable(result.source)}: {result.reason}", file=sys.stderr)

    run = run_batch
    if out_format == "hdf5":
        run = functools.partial(extract_to_shards, shard_size=shard_bytes)
    try:
        if not quiet:
            logging.getLogger("flowprep").addHandler(notes)
            logging.getLogger("flowprep").setLevel(logging.INFO)
        mapper = dask_mapper(scheduler, jobs) if backend == "dask" else None
        results = run(
            entries,
            root,
            out,
            settings,
            options=options,
            jobs=jobs,
            force=force,
            strict=strict,
            mapper=mapper,
            on_result=report,
        )
    except (ShardError, OutputError, ManifestError) as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:  # OUT became unwritable during the run (disk full, remounted read-only)
        cause = f"{exc.filename or out}: cannot write the output ({exc.strerror or exc})"
        raise click.ClickException(cause) from None
    finally:
        logging.getLogger("flowprep").removeHandler(notes)
        bar.close()
    counts = {k: sum(r.status == k for r in results) for k in ("done", "skipped", "failed")}
    ok = counts["done"] + counts["skipped"]
    click.echo(
        f"{ok} succeeded ({counts['done']} extracted, {counts['skipped']} already done), "
        f"{counts['failed']} failed"
        + (f": see {out / 'failures.jsonl'}" if counts["failed"] else "")
        + (" (stopped early: --strict)" if strict and counts["failed"] else ""),
        err=True,
    )
    if counts["failed"]:
        sys.exit(EXIT_SOME_FAILED)


def dask_mapper(scheduler: str | None, jobs: int):
    """A run_batch mapper that sends each video to a Dask cluster (local when no address)."""
    from flowprep.cluster import dask_mapper as make

    try:
        return make(scheduler, jobs)
    except (ImportError, OSError, TimeoutError) as exc:
        raise click.ClickException(f"dask backend unavailable: {exc}") from None


def _bar(quiet: bool) -> tqdm:
    """A progress bar on stderr for pack and verify: shown on a terminal unless -q."""
    return tqdm(unit="video", disable=True if quiet else None, dynamic_ncols=True)


@main.command("viz")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "-o", "--output", type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the PNG panels (the same as giving OUT).",
)  # fmt: skip
@click.option(
    "--video", "video_id",
    help="Video id to draw when FOLDER is a frame-folder root or a shard directory.",
)  # fmt: skip
@click.option("-n", "--limit", type=click.IntRange(min=1), help="Write at most N panels.")
@click.option("--bound", type=float, help="Quantization bound in px [default: from meta.json, 20].")
@click.option("--max-flow", type=float, help="Flow magnitude drawn fully saturated [default: max].")
def viz_command(
    folder: Path,
    out: Path | None,
    output: Path | None,
    video_id: str | None,
    limit: int | None,
    bound: float | None,
    max_flow: float | None,
) -> None:
    """Write PNG panels (frame | flow colour wheel | flow_x | flow_y) of one video FOLDER to OUT.

    FOLDER is one video's folder, or with --video a frame-folder root or shard directory.
    """
    if out is not None and output is not None and out != output:
        raise click.UsageError("give the output folder once: OUT or -o/--output")
    out = out or output
    if out is None:
        raise click.UsageError("missing the output folder: give OUT or -o/--output")
    try:
        written = write_panels(
            folder, out, limit=limit, bound=bound, max_flow=max_flow, video_id=video_id
        )
    except (ValueError, ReaderError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {len(written)} panels to {out}")


@main.command("pack")
@click.argument("frames_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "-o", "--output", "shards_dir", required=True, type=click.Path(path_type=Path),
    help="Directory for the HDF5 shards and index.json.",
)  # fmt: skip
@click.option(
    "--shard-size", default="4GB", show_default=True, help="Target bytes per shard (4GB, 500MB)."
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def pack_command(frames_dir: Path, shards_dir: Path, shard_size: str, quiet: bool) -> None:
    """Pack extracted frame folders into HDF5 shards (JPEG bytes as they are); resumable."""
    try:
        size = parse_size(shard_size)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--shard-size") from None
    bar = _bar(quiet)
    try:
        index = pack(
            frames_dir,
            shards_dir,
            shard_size=size,
            on_start=lambda n: bar.reset(total=n),
            on_packed=lambda ids: bar.update(len(ids)),
        )
    except ShardError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:  # e.g. an output directory that cannot be created
        raise click.ClickException(f"{exc.filename or shards_dir}: {exc.strerror}") from None
    finally:
        bar.close()
    shards = len(set(index["videos"].values()))
    click.echo(f"{len(index['videos'])} videos in {shards} shards under {shards_dir}", err=True)


@main.command("verify")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Manifest (JSON lines from `flowprep index`) the labels and paths must agree with.",
)  # fmt: skip
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def verify_command(path: Path, manifest: Path | None, quiet: bool) -> None:
    """Check frame folders or shards: counts, JPEGs, metadata; one line per problem.

    Exit status: 0 when everything checks out, 1 when any problem was found.
    """
    bar = _bar(quiet)
    try:
        problems = verify(
            path, manifest, on_start=lambda n: bar.reset(total=n), on_video=lambda _: bar.update()
        )
    finally:
        bar.close()
    for problem in problems:
        click.echo(str(problem))
    if problems:
        raise click.ClickException(f"{len(problems)} problems found in {path}")
    click.echo(f"{path}: all videos verified", err=True)
