"""Fail fast on resources: a job checks what it needs against what is free *now* and, when it does
not fit, stops within seconds with one line naming what holds the rest.

Ray queues a task or actor whose resources are taken and waits for them forever; a job that
needs CPUs a Serve app holds (on a small cluster, every one) would hang without a word. Jobs
call :func:`require_free` (all or nothing: training workers, a Tune trial) or
:func:`free_units` (as many as fit: the index job's embedding actors) after connecting to Ray.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Callable

from ops.errors import UserError

# Seconds to wait for resources to come back before failing: a job that follows a deleted Serve app
# or a finished training (jobs.pipeline) finds them released a moment later, not at once.
GRACE_S = 15.0
_POLL_S = 0.5


class ResourceError(UserError):
    """The resources a job needs are not free on the cluster."""


def _fits(need: dict[str, float], free: dict[str, float], units: int = 1) -> bool:
    return all(units * amount <= free.get(name, 0.0) + 1e-9 for name, amount in need.items() if amount > 0)


def _wait_free(fits: Callable[[dict[str, float]], bool], wait_s: float) -> dict[str, float]:
    """``ray.available_resources()`` once ``fits`` it, or when ``wait_s`` has passed."""
    import ray

    deadline = time.monotonic() + wait_s
    while True:
        free = ray.available_resources()
        if fits(free) or time.monotonic() >= deadline:
            return free
        time.sleep(_POLL_S)


def require_free(need: dict[str, float], job: str, what: str, wait_s: float = GRACE_S) -> None:
    """Raise unless ``need`` (e.g. ``{"CPU": 2}``) is free on the cluster within ``wait_s``.

    Args:
        need: Resources the job takes at once.
        job: The job, for the message (``jobs.train``).
        what: What the resources are for (``num_workers=2 x cpus_per_worker=1``).
        wait_s: Grace period for resources that are being released.

    Raises:
        ResourceError: one line: what is needed, what is free of the cluster's total, what holds it.
    """
    free = _wait_free(lambda f: _fits(need, f), wait_s)
    if not _fits(need, free):
        raise ResourceError(shortfall(need, free, job, what))


def free_units(per_unit: dict[str, float], wanted: int, job: str, what: str, wait_s: float = GRACE_S) -> int:
    """How many of ``wanted`` units of ``per_unit`` resources are free (at least one, else raise).

    Waits up to ``wait_s`` for all ``wanted`` to fit, then takes what fits.

    Raises:
        ResourceError: not even one unit fits.
    """
    free = _wait_free(lambda f: _fits(per_unit, f, wanted), wait_s)
    units = next((n for n in range(wanted, 0, -1) if _fits(per_unit, free, n)), 0)
    if units == 0:
        raise ResourceError(shortfall(per_unit, free, job, what))
    return units


def shortfall(need: dict[str, float], free: dict[str, float], job: str, what: str) -> str:
    """The one-line refusal: needed vs free vs total per resource, and the holders of the short ones."""
    import ray

    total = ray.cluster_resources()
    short = [name for name, amount in need.items() if amount > free.get(name, 0.0) + 1e-9]
    parts = [f"{_num(need[n])} {n} but {_num(free.get(n, 0.0))} of the cluster's {_num(total.get(n, 0.0))} "
             f"are free" for n in short]
    if any(need[n] > total.get(n, 0.0) for n in short):
        return f"{job} needs {'; '.join(parts)} ({what}); the cluster is too small: lower it or add nodes"
    held = "; ".join(h for n in short for h in holders(n)) or "nothing listed (tasks finishing?)"
    return (f"{job} needs {'; '.join(parts)} ({what}); held by: {held}; free them (e.g. `serve shutdown -y` for a "
            f"Serve app, `ray job stop` for a job) or ask for less")


def holders(resource: str) -> list[str]:
    """Who holds ``resource`` now: live actors outside placement groups (grouped by class; Serve
    replicas by app and deployment) and placement groups (Ray Train / Tune reserve theirs so)."""
    try:
        import ray
        from ray.util.state import list_actors, list_placement_groups

        # The cluster this driver is connected to: with no address the State API looks for one and
        # refuses when this machine runs several (other users', tests').
        address = ray.get_runtime_context().gcs_address
        actors = list_actors(address=address, filters=[("state", "=", "ALIVE")], detail=True, limit=10_000,
                             timeout=10, raise_on_missing_output=False)
        groups = list_placement_groups(address=address, filters=[("state", "=", "CREATED")], detail=True,
                                       limit=10_000, timeout=10, raise_on_missing_output=False)
    except Exception as exc:  # noqa: BLE001 - the refusal must still come out, without the list
        return [f"(could not list actors: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"]
    return describe_holders(resource, [_as_dict(a) for a in actors], [_as_dict(g) for g in groups])


def describe_holders(resource: str, actors: list[dict[str, Any]], groups: list[dict[str, Any]]) -> list[str]:
    """Readable holders of ``resource`` from State API rows (``list_actors``/``list_placement_groups``)."""
    amount: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for actor in actors:
        held = (actor.get("required_resources") or {}).get(resource, 0.0)
        if held <= 0 or actor.get("placement_group_id"):  # inside a group: counted with the group
            continue
        name = _actor_label(actor.get("class_name") or actor.get("name") or "actor")
        amount[name] += held
        count[name] += 1
    out = [f"{name} x{count[name]} ({_num(amount[name])} {resource})" for name in sorted(amount, key=amount.get,
                                                                                       reverse=True)]
    for group in groups:
        held = sum((b.get("unit_resources") or {}).get(resource, 0.0) for b in group.get("bundles") or [])
        if held > 0:
            name = group.get("name") or str(group.get("placement_group_id", ""))[:12]
            out.append(f"placement group {name} of job {group.get('creator_job_id')} ({_num(held)} {resource})")
    return out


def _actor_label(class_name: str) -> str:
    # Serve names its replica actors "ServeReplica:<app>:<deployment>".
    if class_name.startswith("ServeReplica:"):
        _, app, deployment = (class_name.split(":", 2) + ["", ""])[:3]
        return f"Serve app '{app}' {deployment}"
    return class_name.rsplit(".", 1)[-1]  # a class defined in a function is "f.<locals>.Name"


def _as_dict(row: Any) -> dict[str, Any]:
    return row if isinstance(row, dict) else vars(row)


def _num(x: float) -> str:
    return f"{x:g}"
