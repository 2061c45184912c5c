"""`flowprep extract --backend dask`: a LocalCluster run writes what the local run writes."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_flowprep_extract import tree_bytes

from flowprep.extract import ExtractSettings, run_batch
from flowprep.manifest import build_manifest
from pipelines.synthetic import moving_shapes, write_video

distributed = pytest.importorskip("distributed")


def test_local_cluster_matches_local_run(tmp_path: Path) -> None:
    root = tmp_path / "v"
    for i in range(4):
        write_video(root / f"c{i % 2}" / f"clip{i}.avi", moving_shapes(6, 48, 64, seed=i))
    (root / "c0" / "broken.avi").write_bytes(b"not a video")
    entries = build_manifest(root)
    run_batch(entries, root, tmp_path / "local", ExtractSettings())
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        from flowprep.cluster import dask_mapper

        mapper = dask_mapper(cluster.scheduler_address, 2)
        results = run_batch(entries, root, tmp_path / "dask", ExtractSettings(), mapper=mapper)
        assert [r.status for r in results] == ["failed", "done", "done", "done", "done"]
        again = run_batch(entries, root, tmp_path / "dask", ExtractSettings(), mapper=mapper)
        assert [r.status for r in again] == ["failed", "skipped", "skipped", "skipped", "skipped"]
    assert tree_bytes(tmp_path / "dask") == tree_bytes(tmp_path / "local")
