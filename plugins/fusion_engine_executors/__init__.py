"""fusion-engine first-party plugin: the executors that train members.

- ``local`` (the default): every member in the run's own process, one after another.
- ``ray``: members as Ray tasks, side by side on a Ray cluster (or a local Ray instance), each
  with the CPUs and GPUs its ``resources`` ask for. Needs ``pip install 'fusion-engine[ray]'``;
  Ray is imported only when a run asks for this executor.
"""

from __future__ import annotations

from fusion_engine import ExecutorRecord, LocalExecutor, hookimpl

from .ray_executor import RayParams, create_ray_executor


def _create_local(params) -> LocalExecutor:
    return LocalExecutor()


@hookimpl
def register_executors():
    return [
        ExecutorRecord("local", _create_local,
                       description="in this process, one member after another; resumes checkpoints (the default)"),
        ExecutorRecord("ray", create_ray_executor, RayParams,
                       description="Ray tasks in parallel on a Ray cluster or a local Ray instance, per-member CPUs/GPUs"),
    ]
