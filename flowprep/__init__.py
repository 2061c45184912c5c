"""flowprep: videos to RGB frames, TV-L1 optical flow and HDF5 shards."""

__version__ = "0.1.0"
