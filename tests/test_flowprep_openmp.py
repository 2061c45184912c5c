"""torch's OpenMP runtime starts with short spin-waits, so flow stays fast on a busy machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flowprep import openmp
from pipelines.synthetic import moving_shapes, write_video

WAIT = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def test_spin_count_is_set_unless_the_user_chose_a_wait_policy() -> None:
    environ: dict[str, str] = {"PATH": "/bin"}
    assert openmp.limit_spinning(environ) is True
    assert environ == {"PATH": "/bin", "GOMP_SPINCOUNT": openmp.SPIN_COUNT}
    for name, value in (("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "300000")):
        environ = {name: value}
        assert openmp.limit_spinning(environ) is False
        assert environ == {name: value}  # the user's choice stands, nothing added


def _runtime_settings(args: list[str], env_extra: dict[str, str]) -> str:
    """What torch's OpenMP runtime printed about itself when it loaded (OMP_DISPLAY_ENV)."""
    env = {k: v for k, v in os.environ.items() if k not in WAIT}
    env.update(OMP_DISPLAY_ENV="VERBOSE", **env_extra)
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    if "GOMP_SPINCOUNT" not in done.stderr:
        pytest.skip("torch's OpenMP runtime is not libgomp (or torch has none)")
    return done.stderr


@pytest.mark.parametrize(
    "code",
    [
        "import flowprep.extract, torch; torch.ones(4).sum()",
        "import flowprep.flow",
        "from flowprep.flow_service import resolve_devices; resolve_devices('auto')",
        "import strnet.train, torch; torch.ones(4).sum()",  # training, 2.3-9x faster when busy
        "import strnet.models, torch; torch.ones(4).sum()",
    ],
)
def test_torch_runtime_loads_with_short_spins(code: str) -> None:
    # GOMP_SPINCOUNT is read once, when libgomp loads (with torch): importing flowprep's flow
    # modules must set it before they import torch.
    shown = _runtime_settings([sys.executable, "-c", code], {})
    assert f"GOMP_SPINCOUNT = '{openmp.SPIN_COUNT}'" in shown


def test_extract_runs_flow_with_short_spins_and_keeps_a_users_choice(tmp_path: Path) -> None:
    write_video(tmp_path / "v" / "a.mkv", moving_shapes(3, 32, 48), codec="ffv1")
    args = [sys.executable, "-m", "flowprep", "extract", str(tmp_path / "v"), "-q", "-j", "2"]
    args += ["--modality", "flow", "--flow-compile", "off", "-o"]
    shown = _runtime_settings([*args, str(tmp_path / "o1")], {})
    assert f"GOMP_SPINCOUNT = '{openmp.SPIN_COUNT}'" in shown
    shown = _runtime_settings([*args, str(tmp_path / "o2")], {"GOMP_SPINCOUNT": "12345"})
    assert "GOMP_SPINCOUNT = '12345'" in shown
