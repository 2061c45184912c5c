"""Run per-video extraction on a Dask cluster: the same jobs and outputs as the local run.

Workers write straight into OUT, so OUT must be on a filesystem every worker can reach.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator


def dask_mapper(scheduler: str | None, jobs: int) -> Callable[..., Iterator]:
    """A mapper for `run_batch` that submits each video to Dask, yielding results as they finish.

    With no scheduler address a LocalCluster of `jobs` single-threaded worker processes is
    started for the batch and closed after it.
    """
    from dask.distributed import Client, LocalCluster, as_completed

    def mapper(function: Callable, arg_list: list[tuple]) -> Iterator:
        cluster = None
        if scheduler:
            client = Client(scheduler, timeout="30s")
        else:
            cluster = LocalCluster(
                n_workers=jobs, threads_per_worker=1, processes=True, dashboard_address=None
            )
            client = Client(cluster)
        try:
            futures = [client.submit(function, *args, pure=False) for args in arg_list]
            for future in as_completed(futures):
                yield future.result()
        finally:
            client.close()
            if cluster is not None:
                cluster.close()

    return mapper
