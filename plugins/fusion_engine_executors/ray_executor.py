"""The ``ray`` executor: members train and predict as Ray tasks; results come back through Ray's
object store, and the run stores them in the zoo on the driver, as a local run would.

Images never travel as pixels (unless pixels are all a dataset has: arrays a plugin returned in
memory). What goes to the object store, once per input config, is what opens them (the
dataset's items: file paths, a Hugging Face dataset's Arrow files by name, and the path of the
decoded-image cache): each task reads the cache file where that path holds one (this machine, a
shared registry) and otherwise decodes from the dataset's own storage (a shared folder, the
Hugging Face cache), holding the images in memory when they fit the worker's own memory budget
and streaming them otherwise, with as many decoding workers as the task has CPUs. Weights and
logits come back as numpy arrays; a plugin loaded from a ``.py`` file named in the spec travels
with the task as its source text. Zoo checkpoints are on the driver's disk, so a member's task
starts from epoch 1.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any, Optional

from pydantic import Field

from fusion_engine import Executor, FusionEngineError, JobOutcome, Params, UnreadableImage, loaded_plugin_files

log = logging.getLogger("fusion_engine")

INSTALL_HINT = "pip install 'fusion-engine[ray]'"


class RayParams(Params):
    address: Optional[str] = Field(
        None, description="the cluster: auto (the one this machine belongs to), ray://host:10001, or none to start "
                          "a local Ray instance for the run")
    num_cpus: Optional[int] = Field(None, ge=1, description="CPUs of a local Ray instance (default: all of them)")
    num_gpus: Optional[int] = Field(None, ge=0, description="GPUs of a local Ray instance (default: all of them)")
    max_retries: int = Field(0, ge=0, description="times Ray reruns a member's task whose worker died")
    wait_for_resources: bool = Field(
        False, description="submit a member that asks for more than any node has, and wait for an autoscaler to add "
                           "one (default: that member fails at once)")
    runtime_env: dict[str, Any] = Field(default_factory=dict,
                                        description="Ray runtime_env for the workers, e.g. {pip: [my-plugin]}")


def create_ray_executor(params: RayParams) -> "RayExecutor":
    try:
        import ray  # noqa: F401
    except ImportError:
        raise FusionEngineError(f"the ray executor needs Ray, which is not installed; {INSTALL_HINT}") from None
    return RayExecutor(params)


class RayExecutor(Executor):
    """Members as Ray tasks, each asking for its member's ``resources`` (``cpus``, ``gpus``).

    Connects to ``address``, or starts a local instance; a Ray already initialised in this
    process (a notebook, a test) is used as it is. A Ray this executor started is shut down when
    the run ends.
    """

    name = "ray"
    in_process = False

    def __init__(self, params: RayParams):
        import ray

        self.params = params
        self.started = False
        if ray.is_initialized():
            return
        try:
            ray.init(address=params.address, num_cpus=params.num_cpus, num_gpus=params.num_gpus,
                     runtime_env=params.runtime_env or None, include_dashboard=False, log_to_driver=True,
                     logging_level="warning")
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"the Ray cluster at {params.address}" if params.address else "a local Ray instance"
            raise FusionEngineError(f"cannot start or reach {where}: {' '.join(str(exc).split())}") from None
        self.started = True

    def run(self, jobs, pixels, labels, *, quiet=False, console=None):
        import ray

        task = ray.remote(_fit_on_worker)
        plugin_sources = loaded_plugin_files()
        labels_ref = ray.put({s: v for s, v in labels.items()})
        images_ref: dict[Any, Any] = {}
        files_ref: dict[Path, Any] = {}
        pending: dict[Any, tuple] = {}
        try:
            for job in jobs:
                reason = _unschedulable(job)
                if reason and not self.params.wait_for_resources:
                    yield JobOutcome.failure(job, FusionEngineError(f"{reason}; lower its resources, or set the executor's "
                                                        f"wait_for_resources: true on an autoscaling cluster"))
                    continue
                if reason:
                    log.warning("%s; its task waits until such a node joins", reason)
                cfg = job.input
                if cfg not in images_ref:  # once per input config, shared by every task that needs it
                    images_ref[cfg] = ray.put(pixels(cfg))  # what opens the images, not their pixels
                files = {}
                for field, path in _local_files(job).items():  # e.g. pretrained_file: only on this disk
                    if path not in files_ref:
                        files_ref[path] = ray.put(path.read_bytes())
                    files[field] = (path.name, files_ref[path])
                resources = job.resources
                ref = task.options(num_cpus=resources.cpus, num_gpus=resources.gpus,
                                   max_retries=self.params.max_retries, name=f"fusion-engine:{job.name}").remote(
                    plugin_sources, _dumps(job), images_ref[cfg], labels_ref, files)
                pending[ref] = (job, time.perf_counter())
                if console is not None:
                    console.log(f"{job.label}: [bold]{job.name}[/] submitted to Ray "
                                f"({resources.cpus:g} CPU, {resources.gpus:g} GPU)")
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                job, t0 = pending.pop(done[0])
                try:
                    result = ray.get(done[0])
                except ray.exceptions.RayTaskError as exc:  # the member's own code raised
                    cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                    if isinstance(cause, UnreadableImage):  # bad data fails the run, as it does locally
                        raise UnreadableImage(str(cause)) from None
                    outcome = JobOutcome.failure(job, cause, time.perf_counter() - t0)
                    outcome.traceback = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # the worker's traceback, uncoloured
                    yield outcome
                except ray.exceptions.RayError as exc:  # its worker or node died, or it was cancelled
                    yield JobOutcome.failure(job, exc, time.perf_counter() - t0)
                else:
                    yield JobOutcome(job, result=_from_wire(result), seconds=time.perf_counter() - t0)
        finally:  # the run stopped (Ctrl-C, an error storing a member): free the cluster of its tasks
            for ref in pending:
                ray.cancel(ref, force=True)

    def close(self) -> None:
        if self.started:
            import ray

            ray.shutdown()
            self.started = False


def _unschedulable(job) -> str | None:
    """Why no node of the cluster can run ``job`` now, or None when one can."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    want = {"CPU": job.resources.cpus, "GPU": job.resources.gpus}
    if any(all(node.get(k, 0) >= v for k, v in want.items() if v) for node in nodes):
        return None
    largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
    return (f"member {job.name} asks for {job.resources.cpus:g} CPU and {job.resources.gpus:g} GPU, more than any node "
            f"of the Ray cluster has (the largest: {largest.get('CPU', 0):g} CPU, {largest.get('GPU', 0):g} GPU)")


#: the name under which a member's own weights file (``weights:``, not a backbone parameter) travels
WEIGHTS = "@weights"


def _local_files(job) -> dict[str, Path]:
    """The files on the driver's disk a job reads: those its backbone's parameters name (a
    ``pretrained_file``) and a member's own ``weights``. Their bytes travel with the task, as a
    worker on another node has no such path."""
    files = {name: value for name, value in job.params if isinstance(value, Path) and value.is_file()}
    if job.weights is not None:
        files[WEIGHTS] = Path(job.weights)
    return files


def _dumps(job) -> bytes:
    """The job for the wire, by reference to its modules (plugin files are sent as source)."""
    import ray.cloudpickle as cloudpickle

    return cloudpickle.dumps(job)


def _fit_on_worker(plugin_sources: dict, job_bytes: bytes, images: dict, labels: dict, files: dict):
    """A Ray task: load plugin files, write the files the member's params name, then train and
    predict the member. Runs on a worker."""
    import tempfile

    import ray.cloudpickle as cloudpickle
    import torch

    from fusion_engine import fit_member, import_plugin_source

    for name, (path, source) in plugin_sources.items():
        import_plugin_source(name, path, source)
    job = cloudpickle.loads(job_bytes)
    torch.set_num_threads(max(1, int(job.resources.cpus)))  # what the task was given, not the node's count
    task_images(images, job.resources)
    with tempfile.TemporaryDirectory(prefix="fusion-engine-") as tmp:
        local = {}
        for field, (name, data) in files.items():
            path = Path(tmp) / field / name
            path.parent.mkdir()
            path.write_bytes(data)
            local[field] = path
        if WEIGHTS in local:
            job.weights = local.pop(WEIGHTS)
        if local:
            job.params = job.params.model_copy(update=local)
        fitted = fit_member(job, images, labels, quiet=True)
    fitted.state_dict = {k: v.numpy() for k, v in fitted.state_dict.items()}
    return fitted


def task_images(images: dict, resources) -> dict:
    """A task's image sets made its own: as many decoding workers as its CPUs (none for a 1-CPU
    task), and one memory budget for its splits, of its share of the node (:func:`node_share`)."""
    from fusion_engine import share_memory_budget

    cpus = max(1, int(resources.cpus))
    for image_set in images.values():
        image_set.workers = cpus if cpus > 1 else 0
    share_memory_budget(images.values(), node_share(resources.cpus, resources.gpus))
    return images


def node_share(cpus: float, gpus: float = 0) -> float:
    """The part of this node a task of ``cpus`` CPUs and ``gpus`` GPUs has: the larger of its
    share of the node's CPUs and of its GPUs (a GPU task on a node of many CPUs holds a GPU's
    share of it), so the tasks that fit on a node keep a fractional ``data.memory_budget`` of it
    together. The whole node, with a warning, when Ray cannot say."""
    import ray

    try:
        here = ray.get_runtime_context().get_node_id()
        node = next((n.get("Resources", {}) for n in ray.nodes() if n.get("NodeID") == here), {})
    except Exception as exc:  # an older Ray, or a call outside a task
        log.warning("cannot tell this task's share of its Ray node (%s); its memory budget is of the whole node", exc)
        return 1.0
    shares = [used / node[kind] for used, kind in ((cpus, "CPU"), (gpus, "GPU")) if used and node.get(kind)]
    if not shares:
        log.warning("Ray lists no CPUs for this task's node; its memory budget is of the whole node")
        return 1.0
    return min(1.0, max(shares))


def _from_wire(fitted):
    import numpy as np
    import torch

    fitted.state_dict = {k: torch.from_numpy(np.array(v)) for k, v in fitted.state_dict.items()}
    return fitted
