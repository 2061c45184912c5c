"""strnet: two-stream ResNets, ST-ResNet, STM-ResNet and 3D ResNets in PyTorch."""

# Before anything loads torch: short OpenMP spin-waits, so training on a shared machine does not
# burn its time slices waiting at joins (GOMP_SPINCOUNT; BENCHMARKS.md, "Training on a busy
# machine").
from flowprep import openmp as _openmp  # noqa: F401

__version__ = "0.1.0"
