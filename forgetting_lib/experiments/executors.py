"""Cluster executors for `run_sweep(spec, executor=...)`: Ray, and SLURM through submitit.

Each executor runs a sweep point exactly as the local runner does, `sweep.run_point(point,
notebook=...)`, in the caller's working directory (so the spec's relative paths mean the same
files), on a worker of a Ray cluster or as a SLURM job. Results therefore land in the same
folders and `load_stage` reads them the same way; the workers must see the caller's filesystem
(a shared filesystem, as on any SLURM or Ray cluster that trains from shared storage) and have
the project's environment installed. Each point asks for its stage's `resources:` (see
`sweep_spec`). The executors schedule nothing themselves: they hand every point to the cluster
and return its futures, which `run_sweep` waits on.

Retries belong to the sweep, not to the cluster: a point whose worker dies (killed, out of
memory, a lost node) is recorded as failed, and rerunning the sweep resumes it from its last
checkpoint (`run_point` resumes any unfinished run). Ray never retries a point
(`max_retries=0`). On SLURM, a job that is preempted or reaches its time limit is requeued by
submitit (up to `slurm_max_num_timeout` times for time limits, 3 by default) and its point
resumes from its checkpoint; nothing else is checkpointed.

Both executors are context managers: leaving the block, Ctrl-C included, cancels the points not
finished (what they wrote stays resumable), and a Ray cluster the executor started is shut down.
Ray and submitit are imported only here, inside the classes (`pip install
'forgetting_lib[cluster]'`).
"""

from __future__ import annotations

import importlib
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

from .sweep_spec import Point

CLUSTER_EXTRA = "pip install 'forgetting_lib[cluster]'"
PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the forgetting_lib package


class ClusterError(RuntimeError):
    """A cluster executor cannot start; the message says what to install or where to run."""


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ClusterError(
            f"sweeps on a cluster need the `{module}` package ({err}): {CLUSTER_EXTRA}"
        ) from None


def run_in(cwd: str, fn: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any]) -> Any:
    """`fn(*args, **kwargs)` run in the folder `cwd` (the caller's), progress as plain lines;
    what a cluster worker executes for one point."""
    from .notebooks import plain_progress

    previous = os.getcwd()
    os.chdir(cwd)
    try:
        with plain_progress():
            return fn(*args, **kwargs)
    finally:
        os.chdir(previous)


def _resources(args: tuple) -> dict[str, Any]:
    """The resources of the point among a submission's arguments (none: the cluster defaults)."""
    return next((dict(a.resources) for a in args if isinstance(a, Point)), {})


class RayExecutor:
    """Sweep points as Ray tasks. `address`: None or "local" starts a Ray cluster on this
    machine (shut down on exit); "auto" joins the cluster this machine belongs to; "ray://..."
    or "host:port" a given one. `init` options go to `ray.init` (e.g. `num_cpus=2`); the workers
    get this project's folder on their PYTHONPATH. A Ray session this process already opened is
    used as it is (address and options then do not apply) and left open. A point asks for
    `resources.cpus` CPUs (default 1), `resources.gpus` GPUs (default 0; Ray then hides the GPUs
    from it) and `resources.memory_gb` (a scheduling figure: Ray does not enforce it); `time_min`,
    `partition` and `slurm` do not apply to Ray."""

    def __init__(self, address: str | None = None, *, runtime_env: Mapping[str, Any] | None = None, **init):
        self._ray = ray = _require("ray")
        self._started = not ray.is_initialized()
        if self._started:
            env = dict(runtime_env or {})
            env["env_vars"] = {
                "PYTHONPATH": f"{PROJECT_ROOT}:${{PYTHONPATH}}",
                "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1",  # a point without `gpus` sees none
                **env.get("env_vars", {}),
            }
            ray.init(address=address or "local", runtime_env=env, **init)
        self._task = ray.remote(max_retries=0)(run_in)
        # a point on GPUs gets a fresh worker process: JAX keeps the devices it found (and the GPU
        # memory it took) for the life of a process, and the next point may be given other GPUs
        self._gpu_task = ray.remote(max_retries=0, max_calls=1)(run_in)
        self._refs: list[Any] = []

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run `fn(*args, **kwargs)` as a Ray task; returns a concurrent.futures.Future."""
        options = self.options(_resources(args))
        task = self._gpu_task if options["num_gpus"] else self._task
        ref = task.options(**options).remote(os.getcwd(), fn, args, kwargs)
        self._refs.append(ref)
        return ref.future()

    @staticmethod
    def options(resources: Mapping[str, Any]) -> dict[str, Any]:
        """Ray task options for a point's resources."""
        options: dict[str, Any] = {
            "num_cpus": resources.get("cpus", 1),
            "num_gpus": resources.get("gpus", 0),
        }
        if "memory_gb" in resources:
            options["memory"] = int(resources["memory_gb"] * 2**30)
        return options

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Cancel the tasks not finished (`cancel_futures`, or `wait=False`), then shut down a
        Ray session this executor started."""
        if self._refs and (cancel_futures or not wait):
            _, pending = self._ray.wait(self._refs, num_returns=len(self._refs), timeout=0)
            for ref in pending:
                self._ray.cancel(ref, force=True)
        elif self._refs:
            self._ray.wait(self._refs, num_returns=len(self._refs))
        self._refs = []
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, kind: Any, *_: Any) -> None:
        self.shutdown(wait=kind is None, cancel_futures=kind is not None)


class SlurmExecutor:
    """Sweep points as SLURM jobs, through `submitit.AutoExecutor(folder, cluster)`; the job
    scripts, pickles and logs of every point go to `folder`. `cluster`: "slurm" (the default;
    it needs `sbatch` on this machine), "local" (subprocesses on this machine) or "debug" (in
    this process). Each job asks for its point's `resources`: gpus -> gpus_per_node, cpus ->
    cpus_per_task, memory_gb -> mem_gb, time_min -> timeout_min (default `timeout_min`),
    partition (default `partition`), slurm -> extra sbatch options merged over
    `additional_parameters`. Further submitit parameters (`slurm_account`, `slurm_qos`,
    `slurm_max_num_timeout`, `slurm_setup`, ...) pass through `parameters`."""

    def __init__(
        self,
        folder: str | Path,
        *,
        cluster: str = "slurm",
        partition: str | None = None,
        timeout_min: int = 240,
        additional_parameters: Mapping[str, Any] | None = None,
        **parameters: Any,
    ):
        self._submitit = _require("submitit")
        if cluster == "slurm" and shutil.which("sbatch") is None:
            raise ClusterError(
                "`sbatch` is not on this machine's PATH: run a SLURM sweep from a login node of the "
                "cluster (or use the ray or local executor)"
            )
        self.folder, self.cluster = Path(folder), cluster
        self.defaults = {
            "partition": partition,
            "timeout_min": timeout_min,
            "additional": dict(additional_parameters or {}),
        }
        self.parameters = parameters
        self._jobs: list[Any] = []

    def parameters_for(self, resources: Mapping[str, Any], name: str = "sweep") -> dict[str, Any]:
        """The submitit parameters of a job asking for `resources` (a point's)."""
        params: dict[str, Any] = {
            "name": name,
            "timeout_min": math.ceil(resources.get("time_min", self.defaults["timeout_min"])),
            "gpus_per_node": resources.get("gpus", 0),
            "cpus_per_task": resources.get("cpus", 1),
            "tasks_per_node": 1,
            "nodes": 1,
            **({"mem_gb": resources["memory_gb"]} if "memory_gb" in resources else {}),
            # so that the job imports this project's code (also when it is not installed)
            "slurm_setup": [f"export PYTHONPATH={PROJECT_ROOT}${{PYTHONPATH:+:$PYTHONPATH}}"],
            **self.parameters,
        }
        partition = resources.get("partition", self.defaults["partition"])
        if partition:
            params["slurm_partition"] = partition
        extra = {**self.defaults["additional"], **dict(resources.get("slurm") or {})}
        if extra:
            params["slurm_additional_parameters"] = extra
        return params

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Submit `fn(*args, **kwargs)` as one job; returns the submitit Job (it has `.result()`)."""
        point = next((a for a in args if isinstance(a, Point)), None)
        name = f"{point.stage}/{point.id}" if point else getattr(fn, "__name__", "sweep")
        executor = self._submitit.AutoExecutor(folder=self.folder, cluster=self.cluster)
        executor.update_parameters(**self.parameters_for(_resources(args), name))  # one executor per job:
        job = executor.submit(_Requeued(), os.getcwd(), fn, args, kwargs)  # no parameter leaks to the next
        self._jobs.append(job)
        return job

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Cancel the jobs not finished (`cancel_futures`, or `wait=False`), or wait for them."""
        for job in self._jobs:
            if cancel_futures or not wait:
                if not job.done():
                    job.cancel(check=False)
            else:
                job.wait()
        self._jobs = []

    def __enter__(self) -> SlurmExecutor:
        return self

    def __exit__(self, kind: Any, *_: Any) -> None:
        self.shutdown(wait=kind is None, cancel_futures=kind is not None)


class _Requeued:
    """`run_in` as a submitit checkpointable callable: a job preempted or at its time limit is
    requeued with the same arguments, and its point resumes from the run's own checkpoint."""

    def __call__(self, cwd: str, fn: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any]) -> Any:
        return run_in(cwd, fn, args, kwargs)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)
