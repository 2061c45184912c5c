"""flowprep.layout, the one owner of the on-disk contract, and the import rules around it.

The import checks parse every module with `ast` (imports inside functions count too): readers
never import the extractor, so importing the reader loads no PyAV and no flow service, and
evaluation never imports the trainer.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from flowprep.layout import (
    LIST_NAME,
    annotation_lists,
    frame_glob,
    frame_index,
    frame_name,
    list_name,
    read_list,
    read_lists,
    write_lists,
)

REPO = Path(__file__).resolve().parents[1]
# the extractor and the modules split out of it, and the CLI that runs them
EXTRACT_USERS = {"flowprep.extract", "flowprep.extract_hdf5", "flowprep.cli"}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at any depth: `import a.b`, `from a.b import c` (a.b, a.b.c)."""
    found: set[str] = set()
    package = module_name(path).rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from .mod import y
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def modules_of(package: str) -> list[Path]:
    return sorted((REPO / package).glob("*.py"))


def test_only_the_extractor_and_cli_import_extract():
    offenders = [
        module_name(p)
        for p in modules_of("flowprep")
        if module_name(p) not in EXTRACT_USERS and "flowprep.extract" in imported_modules(p)
    ]
    assert offenders == []


@pytest.mark.parametrize("module", ["settings", "ownership", "resume", "writing"])
def test_extraction_jobs_are_separate_modules(module):
    """extract.py joins settings, OUT ownership, resume and frame writing, each its own module;
    none of them imports the scheduler, and ownership/resume need no decoder."""
    imports = imported_modules(REPO / "flowprep" / f"{module}.py")
    assert "flowprep.extract" not in imports
    if module in ("settings", "ownership", "resume"):
        assert not {"flowprep.decode", "flowprep.writing", "av", "torch"} & imports


def test_strnet_never_imports_the_extractor():
    users = [
        module_name(p)
        for p in modules_of("strnet")
        if {"flowprep.extract", "flowprep.extract_hdf5"} & imported_modules(p)
    ]
    assert users == []


@pytest.mark.parametrize("module", ["reader", "shards", "verify", "viz", "layout"])
def test_readers_and_packer_share_only_the_layout(module):
    """Of extract, shards, reader, verify and viz, none imports the extractor or the packer's
    internals except through their public entry points; layout imports none of them."""
    imports = imported_modules(REPO / "flowprep" / f"{module}.py")
    assert "flowprep.extract" not in imports
    assert "flowprep.decode" not in imports and "flowprep.flow_service" not in imports
    if module == "layout":
        assert not {f"flowprep.{m}" for m in ("reader", "shards", "verify", "viz")} & imports
    if module in ("reader", "verify", "viz"):
        assert "flowprep.shards" not in imports


def test_flowprep_library_modules_are_click_free():
    """Commands live in flowprep.cli; the modules it calls take plain arguments."""
    users = [module_name(p) for p in modules_of("flowprep") if "click" in imported_modules(p)]
    assert users == ["flowprep.cli"]


def test_strnet_library_modules_are_click_free():
    """strnet's commands live in strnet.cli (its --device type is flowprep.cli's, written once);
    train, evaluate, predict and summary take plain arguments and raise plain exceptions."""
    users = [module_name(p) for p in modules_of("strnet") if "click" in imported_modules(p)]
    assert users == ["strnet.cli"]
    assert "flowprep.cli" in imported_modules(REPO / "strnet" / "cli.py")


def test_strnet_data_takes_the_list_format_from_layout():
    imports = imported_modules(REPO / "strnet" / "data.py")
    assert "flowprep.layout" in imports
    assert not {"flowprep.extract", "flowprep.shards"} & imports


def test_evaluation_does_not_import_the_trainer():
    for name in ("evaluate", "predict", "runtime", "scores"):
        imports = imported_modules(REPO / "strnet" / f"{name}.py")
        assert "strnet.train" not in imports, name


def test_importing_the_reader_loads_no_decoder():
    code = (
        "import sys, flowprep.reader, flowprep.layout\n"
        "bad = [m for m in ('av', 'flowprep.extract', 'flowprep.decode', 'flowprep.flow_service',"
        " 'flowprep.flow', 'torch') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == ""


def test_frame_names_are_one_based_on_disk():
    assert frame_name("img", 0) == "img_00001.jpg"
    assert frame_name("flow_x", 9) == "flow_x_00010.jpg"
    assert frame_name("flow", 0) == "flow_00001.npy"
    assert frame_index("flow_y_00010.jpg") == 9
    assert frame_index(frame_name("img", 123456)) == 123456
    assert frame_glob("img") == "img_[0-9]*.jpg" and frame_glob("flow") == "flow_[0-9]*.npy"
    with pytest.raises(ValueError, match="not a frame file name"):
        frame_index("meta.json")


def test_list_names_and_lines(tmp_path):
    assert list_name() == "all.txt" and list_name(flow=True) == "all_flow.txt"
    assert list_name("train", 1) == "train_split1.txt"
    assert list_name("test", "3", flow=True) == "test_split3_flow.txt"
    assert all(LIST_NAME.fullmatch(list_name(s, 2, flow=f)) for s in ("train", "test")
               for f in (False, True))  # fmt: skip
    lists = annotation_lists(
        [
            ("c/a", 5, 4, 0, {"1": "train", "2": "test", "3": "unused"}),
            ("c/b", 3, None, None, {"1": "test"}),
            ("loose", 2, 1, 1, {}),
        ]
    )
    assert lists == {
        "train_split1.txt": "c/a 5 0\n",
        "test_split2.txt": "c/a 5 0\n",
        "train_split1_flow.txt": "c/a 4 0\n",
        "test_split2_flow.txt": "c/a 4 0\n",
        "test_split1.txt": "c/b 3 -1\n",
        "all.txt": "loose 2 1\n",
        "all_flow.txt": "loose 1 1\n",
    }
    (tmp_path / "train_split9.txt").write_text("stale 1 0\n")
    (tmp_path / "notes.txt").write_text("kept\n")
    write_lists(tmp_path, lists)
    assert read_lists(tmp_path) == lists  # the stale list is gone, other files stay
    assert (tmp_path / "notes.txt").read_text() == "kept\n"
    assert read_list(tmp_path / "train_split1.txt") == [("c/a", 0)]
    (tmp_path / "bad.txt").write_text("c/a 5 0\n\nc/b 3\n")
    with pytest.raises(ValueError, match=r"bad\.txt:3: expected '<video_id> <num_frames> <label>'"):
        read_list(tmp_path / "bad.txt")


def test_code_map_names_every_module():
    """docs/internals.md's code map lists each module of the three packages under its package."""
    text = (REPO / "docs" / "internals.md").read_text().split("## Code map", 1)[1]
    for package in ("flowprep", "strnet", "pipelines"):
        section = text.split(f"**{package}**", 1)[1].split("**", 1)[0]
        for path in modules_of(package):
            if not path.stem.startswith("__"):
                assert f"- `{path.stem}`: " in section, f"{package}.{path.stem}"
