"""cluster/resources.py: jobs stop within seconds, naming who holds the resources, when what they
need is not free (unit tests with made-up numbers; one integration test on a real cluster)."""

from __future__ import annotations

import time

import pytest

from cluster import resources
from cluster.resources import ResourceError, describe_holders, free_units, require_free

SERVE_ACTORS = [
    {"class_name": "ServeReplica:rag:Generator", "required_resources": {"CPU": 1.0}, "placement_group_id": None},
    {"class_name": "ServeReplica:rag:Retriever", "required_resources": {"CPU": 0.5}, "placement_group_id": None},
    {"class_name": "ServeReplica:rag:Ingress", "required_resources": {}, "placement_group_id": None},
    {"class_name": "ServeController", "required_resources": {"CPU": 0.0}, "placement_group_id": None},
    {"class_name": "RayTrainWorker", "required_resources": {"CPU_group_ab": 1.0}, "placement_group_id": "ab"},
]
GROUPS = [{"placement_group_id": "abcdef0123456789", "name": "", "creator_job_id": "02000000",
           "bundles": [{"unit_resources": {"CPU": 1.0}}, {"unit_resources": {"CPU": 1.0}}]}]


@pytest.fixture
def cluster(monkeypatch):
    """A fake cluster of 4 CPUs; `state["free"]` is what ray.available_resources() answers."""
    import ray
    import ray.util.state

    state = {"free": {"CPU": 4.0}, "calls": 0}

    def available() -> dict:
        state["calls"] += 1
        return dict(state["free"])

    monkeypatch.setattr(ray, "available_resources", available)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0, "memory": 1e9})
    monkeypatch.setattr(ray, "get_runtime_context", lambda: type("Ctx", (), {"gcs_address": "127.0.0.1:6379"})())
    monkeypatch.setattr(ray.util.state, "list_actors", lambda **kw: SERVE_ACTORS)
    monkeypatch.setattr(ray.util.state, "list_placement_groups", lambda **kw: GROUPS)
    monkeypatch.setattr(resources, "_POLL_S", 0.01)
    return state


def test_what_fits_passes_at_once(cluster):
    require_free({"CPU": 4, "GPU": 0}, "jobs.train", "num_workers=4 x cpus_per_worker=1", wait_s=5)
    assert cluster["calls"] == 1


def test_taken_resources_fail_within_the_grace_period_naming_the_holders(cluster):
    cluster["free"] = {"CPU": 0.5}
    t0 = time.monotonic()
    with pytest.raises(ResourceError) as err:
        require_free({"CPU": 2}, "jobs.train", "num_workers=2 x cpus_per_worker=1", wait_s=0.3)
    # It asked again while the grace period ran and gave up once it was over (a job that waited
    # on without end would hit the test timeout instead).
    assert cluster["calls"] > 1 and time.monotonic() - t0 >= 0.3
    assert str(err.value) == (
        "jobs.train needs 2 CPU but 0.5 of the cluster's 4 are free (num_workers=2 x cpus_per_worker=1); held by: "
        "Serve app 'rag' Generator x1 (1 CPU); Serve app 'rag' Retriever x1 (0.5 CPU); placement group abcdef012345 "
        "of job 02000000 (2 CPU); free them (e.g. `serve shutdown -y` for a Serve app, `ray job stop` for a job) or "
        "ask for less")


def test_resources_released_during_the_grace_period_are_waited_for(cluster, monkeypatch):
    import ray

    answers = iter([{"CPU": 0.0}, {"CPU": 0.0}, {"CPU": 2.0}])
    monkeypatch.setattr(ray, "available_resources", lambda: next(answers))
    require_free({"CPU": 2}, "jobs.train", "x", wait_s=5)  # the third look finds them


def test_more_than_the_cluster_has_says_so(cluster):
    cluster["free"] = {"CPU": 4.0}
    with pytest.raises(ResourceError, match="needs 8 CPU but 4 of the cluster's 4 are free .*too small"):
        require_free({"CPU": 8}, "jobs.tune", "one trial", wait_s=0)


def test_free_units_takes_what_fits_and_refuses_none(cluster):
    cluster["free"] = {"CPU": 1.5}
    assert free_units({"CPU": 1}, 4, "jobs.index", "embedding actors", wait_s=0.05) == 1
    cluster["free"] = {"CPU": 4.0}
    assert free_units({"CPU": 1}, 2, "jobs.index", "embedding actors", wait_s=0.05) == 2
    cluster["free"] = {}  # Ray leaves out a resource with nothing free
    with pytest.raises(ResourceError, match="jobs.index needs 1 CPU but 0 of the cluster's 4 are free"):
        free_units({"CPU": 1}, 2, "jobs.index", "embedding actors", wait_s=0.05)


def test_holders_count_a_placement_group_once_not_its_actors():
    held = describe_holders("CPU", SERVE_ACTORS, GROUPS)
    assert held == ["Serve app 'rag' Generator x1 (1 CPU)", "Serve app 'rag' Retriever x1 (0.5 CPU)",
                    "placement group abcdef012345 of job 02000000 (2 CPU)"]
    assert describe_holders("GPU", SERVE_ACTORS, GROUPS) == []


def test_index_job_embeds_with_the_actors_that_fit(monkeypatch, tmp_path, tiny_text_file):
    """jobs.index on a cluster with one free CPU runs one embedding actor instead of waiting."""
    from jobs import index

    asked: list[int] = []
    monkeypatch.setattr(index, "init_ray", lambda: {})
    monkeypatch.setattr(index, "free_units", lambda per_unit, wanted, job, what: 1)
    monkeypatch.setattr(index, "embed_chunks", lambda texts, embedder, batch_size, workers, cpus=1, dtype="auto": asked.append(workers)
                        or __import__("numpy").zeros((len(texts), 384), dtype="float32"))
    index.main(index.IndexConfig(data=str(tiny_text_file), storage=str(tmp_path), workers=3))
    assert asked == [1]


@pytest.mark.integration
def test_an_actor_holding_the_cpus_is_named(ray_local):
    """On a real 2-CPU cluster: an actor holding both CPUs makes a 1-CPU job fail in seconds."""
    import ray

    @ray.remote(num_cpus=2)
    class CpuHog:
        def ready(self) -> bool:
            return True

    hog = CpuHog.remote()
    ray.get(hog.ready.remote())
    try:
        # Refused after the 1 s grace period (no wait without end: that would hit the test timeout).
        with pytest.raises(ResourceError, match=r"jobs.train needs 1 CPU but 0 of the cluster's 2 are free .*"
                                                r"held by: CpuHog x1 \(2 CPU\)"):
            require_free({"CPU": 1}, "jobs.train", "num_workers=1 x cpus_per_worker=1", wait_s=1)
    finally:
        ray.kill(hog)
