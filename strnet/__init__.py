"""strnet: two-stream ResNets, ST-ResNet, STM-ResNet and 3D ResNets in PyTorch."""

__version__ = "0.1.0"
