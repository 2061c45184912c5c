"""strnet.runtime's device choice: auto, cpu, cuda and cuda:N, in run.device and every --device."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from strnet.cli import eval_command, predict_command, train_command
from strnet.config import ConfigError
from strnet.runtime import DeviceError, setup_device


def test_cpu_and_auto_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert setup_device("cpu").device == torch.device("cpu")
    assert setup_device("auto").device == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_a_gpu_asked_for_without_one_is_a_device_error(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match=rf"^device '{name}' asked for but no GPU is available"):
        setup_device(name)


def test_cuda_n_beyond_the_gpus_is_a_device_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(DeviceError, match=r"^device 'cuda:2' asked for but this machine has 2"):
        setup_device("cuda:2")


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "CPU", "cuda0"])
def test_bad_device_names(name):
    with pytest.raises(ConfigError, match="device must be auto, cpu, cuda or cuda:N"):
        setup_device(name)


@pytest.mark.parametrize("command", [train_command, eval_command, predict_command])
def test_every_device_option_takes_cuda_n_and_refuses_other_names(command):
    runner = CliRunner()
    r = runner.invoke(command, ["--help"])
    assert r.exit_code == 0 and "auto|cpu|cuda[:N]" in r.output
    r = runner.invoke(command, ["--device", "gpu", "x"])
    assert r.exit_code == 2
    assert "'gpu' is not one of auto, cpu, cuda or cuda:N" in r.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_n_picks_that_gpu():
    ctx = setup_device(f"cuda:{torch.cuda.device_count() - 1}")
    assert ctx.device == torch.device("cuda", torch.cuda.device_count() - 1)
