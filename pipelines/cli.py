"""The `pipelines` command line: render the synthetic set, run a paper table end to end."""

from __future__ import annotations

from pathlib import Path

import click

from pipelines.config import PipelineError, load_pipeline, shipped_configs

EXIT_HELP = """Exit status: 0 the table was written; 1 a bad config, data root or a stage failed
(finished stages stay finished: run the same command again to continue); 130 interrupted."""


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option("0.1.0", prog_name="pipelines")
def main() -> None:
    """One command per paper table: videos -> flow -> shards -> every training phase -> table."""


@main.command("synth")
@click.option(
    "-o",
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder to write videos/, classInd.txt and the train/test lists into.",
)
@click.option("--classes", default="", help="Comma-separated class names (default: all eight).")
@click.option(
    "--per-class", type=click.IntRange(1), default=12, show_default=True, help="Videos per class."
)
@click.option(
    "--frames", type=click.IntRange(2), default=32, show_default=True, help="Frames per video."
)
@click.option("--size", default="96x96", show_default=True, help="WIDTHxHEIGHT, both even.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every draw.")
def synth_command(out: Path, classes: str, per_class: int, frames: int, size: str, seed: int):
    """Render the synthetic action set in UCF101's layout (classes need different evidence)."""
    from pipelines.synthetic import write_action_set

    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise click.UsageError(f"--size {size!r} is not WIDTHxHEIGHT") from None
    names = [c.strip() for c in classes.split(",") if c.strip()] or None
    try:
        info = write_action_set(
            out, classes=names, per_class=per_class, frames=frames, size=(width, height), seed=seed
        )
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {len(info['classes'])} classes x {per_class} videos -> {out}")


def parse_data(items: tuple[str, ...]) -> dict[str, Path] | Path | None:
    """`--data ROOT` (the only dataset) or `--data NAME=ROOT` (one per dataset)."""
    if len(items) == 1 and "=" not in items[0]:
        return Path(items[0])
    out = {}
    for item in items:
        name, sep, root = item.partition("=")
        if not sep:
            raise click.UsageError(f"--data {item!r}: use NAME=ROOT when giving several")
        out[name] = Path(root)
    return out


@main.command("run", epilog=EXIT_HELP)
@click.argument("config")
@click.option(
    "--data",
    "data",
    multiple=True,
    metavar="[NAME=]ROOT",
    help="Dataset root (UCF101: UCF-101/ + ucfTrainTestlist/; Kinetics: annotations/*.csv "
    "+ clips; a synthetic set: videos/ + classInd.txt); NAME= picks the dataset when the "
    "table has several.",
)
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Run folder (default: out/<config name>).",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config value, e.g. --set train.model.width=16 or "
    "--set phases.motion.optim.iterations=[100]; repeatable.",
)
@click.option("--dry-run", is_flag=True, help="List the stages and whether they are cached.")
def run_command(config: str, data: tuple, out: Path | None, overrides: tuple, dry_run: bool):
    """Run every stage of a paper table: CONFIG is a shipped name or a TOML file.

    Shipped: synthetic_mini (the README's demo), synthetic_ci, st_resnet_table3,
    fusion_table1, resnet3d_table2.
    """
    from pipelines.pipeline import run_pipeline, stage_status

    try:
        cfg = load_pipeline(config, overrides)
        roots = parse_data(data) if data else None
        if isinstance(roots, Path):
            if len(cfg.datasets) != 1:
                raise PipelineError(
                    f"{config} has datasets {', '.join(cfg.datasets)}: use --data NAME=ROOT"
                )
            roots = {next(iter(cfg.datasets)): roots}
        run = out or Path("out") / Path(config).stem
        if dry_run:
            for name, state in stage_status(cfg, run, roots or {}):
                click.echo(f"{state:8s} {name}")
            return
        table = run_pipeline(cfg, run, roots or {}, echo=click.echo)
    except PipelineError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        click.echo("interrupted: run the same command again to continue", err=True)
        raise SystemExit(130) from None
    click.echo(f"table: {table} (and table.csv, table.png beside it)")


@main.command("list")
def list_command() -> None:
    """List the shipped pipeline configs."""
    for name in shipped_configs():
        click.echo(f"{name:20s} {load_pipeline(name).title}")
