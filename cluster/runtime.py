"""Connecting to Ray: ``RAY_ADDRESS`` when set, else a local cluster bound to loopback."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from cluster.storage import AWS_ENV, CACHE_ENV, LAUNCH_DIR_ENV, STORAGE_ENV

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
# What a `--working-dir .` upload leaves out: the virtualenv, artifacts and build caches are big
# and node-specific; Ray already skips what .gitignore lists, this makes it explicit.
WORKING_DIR_EXCLUDES = [".venv/", "artifacts/", ".git/", "**/__pycache__/", "*.so", "build/", ".pytest_cache/"]
# Variables a job's workers need to see the same way as the driver.
# RAYLM_CACHE is node-local by meaning; forwarded so that one machine's workers use the driver's,
# it names the same path (on each node's own disk) on a real cluster. The AWS variables let every
# worker reach the storage URI the driver was given.
_FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "RAYLM_OPS", "RAYLM_BUILD_CACHE", CACHE_ENV,
                  STORAGE_ENV, LAUNCH_DIR_ENV, "RAYLM_FAIL_AT_STEP", "OMP_NUM_THREADS", *AWS_ENV)
PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
# Wake-ups of an idle cluster that cost a small machine CPU for nothing (bench/idle_cost.py,
# docs/benchmarks/idle_cost.md): the Serve controller's reconcile loop (Ray: every 0.1 s), each
# handle's router metrics export (every 0.1 s) and the dashboard agent's parent check (0.4 s).
# Ray reads them when its processes start, so they are set before a cluster starts (init_ray's local
# cluster, `make ray-up`); health checks and failure detection are untouched, and the benchmark
# times a killed replica's replacement with and without them.
IDLE_ENV = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5", "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
            "RAY_DASHBOARD_AGENT_CHECK_PARENT_INTERVAL_S": "2"}
RAY_DEFAULTS_ENV = "RAYLM_RAY_DEFAULTS"  # "1": leave Ray's own intervals (for the benchmark's baseline)


def apply_idle_env() -> dict[str, str]:
    """Sets :data:`IDLE_ENV` in this process's environment (values already set win); returns what applies."""
    if os.environ.get(RAY_DEFAULTS_ENV) == "1":
        return {}
    for key, value in IDLE_ENV.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in IDLE_ENV}


def worker_env() -> dict[str, str]:
    """Environment variables forwarded to Ray workers started by this driver."""
    env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    env.setdefault("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "1"))
    # Ray Train V2 routes a worker's print() to its logger *and* tees it to the worker's stdout
    # (Ray wraps sys.stdout), so every progress line reached the job log twice. Plain prints once.
    env.setdefault(PRINT_PATCH_ENV, os.environ.get(PRINT_PATCH_ENV, "0"))
    # Ray Train V2's controller takes one report per worker per poll, polls at most every 2 s by
    # default, and a worker's next report blocks until the last was taken: per-step reports
    # throttle any step shorter than the poll (2 s by default). Poll faster;
    # jobs.train also never reports more often than this interval (see report_interval_s).
    env.setdefault(HEALTH_CHECK_ENV, os.environ.get(HEALTH_CHECK_ENV, "0.2"))
    return env


def local_runtime_env() -> dict[str, Any]:
    """runtime_env for a cluster on this machine: workers import the project from this checkout."""
    env = worker_env()
    path = [str(REPO_ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(path)
    return {"env_vars": env}


def submit_runtime_env(launch_dir: str | None = None) -> dict[str, Any]:
    """runtime_env for ``ray job submit``: upload this checkout, remember where the user launched."""
    env = worker_env()
    env[LAUNCH_DIR_ENV] = launch_dir or os.getcwd()
    return {"working_dir": str(REPO_ROOT), "excludes": WORKING_DIR_EXCLUDES, "env_vars": env}


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs: Any) -> dict[str, Any]:
    """Connect to Ray once per process and return the cluster's resources.

    ``address`` (or ``RAY_ADDRESS``, set by ``ray job submit``) connects to an existing cluster;
    otherwise a local one starts bound to 127.0.0.1 with its dashboard on 127.0.0.1.
    """
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        logging.getLogger("ray").setLevel(logging.WARNING)
        if address:
            # Inside `ray job submit` the job's runtime_env already applies to its workers; a
            # plain driver attached to a cluster on this machine ships the checkout's path.
            if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ and _is_local(address):
                kwargs.setdefault("runtime_env", local_runtime_env())
            ray.init(address=address, log_to_driver=True, **kwargs)
        else:
            apply_idle_env()  # the cluster's processes inherit this environment
            # address="local": always a new cluster of this process's own, never an existing one
            # another program on this machine started (`ray start`, a test, a benchmark).
            ray.init(
                address="local",
                _node_ip_address="127.0.0.1",
                dashboard_host="127.0.0.1",
                # The dashboard serves the State API, which Ray Train uses to clean up after a
                # stopped trial; without it a stopped Tune trial leaks its workers' CPUs.
                include_dashboard=True,
                num_cpus=num_cpus,
                runtime_env=local_runtime_env(),
                log_to_driver=True,
                **kwargs,
            )
    return ray.cluster_resources()


def _is_local(address: str) -> bool:
    host = address.split("://")[-1].split(":")[0]
    return address == "auto" or host in ("127.0.0.1", "localhost", "")


def cluster_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 0))


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def report_interval_s() -> float:
    """Seconds between two Ray Train reports of one worker that never block it: the interval at
    which the controller collects them (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, Ray's default 2 s)."""
    try:
        return max(0.0, float(os.environ.get(HEALTH_CHECK_ENV, "2.0")))
    except ValueError:
        return 2.0


if __name__ == "__main__":
    # `make ray-up`: the KEY=VALUE pairs `ray start` runs with
    print(" ".join(f"{k}={v}" for k, v in apply_idle_env().items()))
