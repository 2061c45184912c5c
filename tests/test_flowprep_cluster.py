"""`flowprep extract --backend dask`: a LocalCluster run writes what the local run writes,
as frame folders and as shards (`--format hdf5`), and resumes the same way."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_flowprep_extract import tree_bytes

from flowprep.extract import run_batch
from flowprep.extract_hdf5 import extract_to_shards
from flowprep.manifest import build_manifest
from flowprep.settings import ExtractSettings
from pipelines.synthetic import moving_shapes, write_video

distributed = pytest.importorskip("distributed")


def test_local_cluster_matches_local_run(tmp_path: Path) -> None:
    root = tmp_path / "v"
    for i in range(4):
        write_video(root / f"c{i % 2}" / f"clip{i}.avi", moving_shapes(6, 48, 64, seed=i))
    (root / "c0" / "broken.avi").write_bytes(b"not a video")
    entries = build_manifest(root)
    run_batch(entries, root, tmp_path / "local", ExtractSettings())
    extract_to_shards(entries, root, tmp_path / "local-h5", ExtractSettings(), shard_size=20_000)
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        from flowprep.cluster import dask_mapper

        mapper = dask_mapper(cluster.scheduler_address, 2)
        results = run_batch(entries, root, tmp_path / "dask", ExtractSettings(), mapper=mapper)
        assert [r.status for r in results] == ["failed", "done", "done", "done", "done"]
        again = run_batch(entries, root, tmp_path / "dask", ExtractSettings(), mapper=mapper)
        assert [r.status for r in again] == ["failed", "skipped", "skipped", "skipped", "skipped"]
        packed = extract_to_shards(
            entries, root, tmp_path / "dask-h5", ExtractSettings(), shard_size=20_000, mapper=mapper
        )
        assert [r.status for r in packed] == ["failed", "done", "done", "done", "done"]
    assert tree_bytes(tmp_path / "dask") == tree_bytes(tmp_path / "local")
    shards = tree_bytes(tmp_path / "dask-h5")
    assert len([name for name in shards if name.endswith(".h5")]) >= 2
    assert shards == tree_bytes(tmp_path / "local-h5")
