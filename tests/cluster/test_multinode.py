"""A multi-node Ray cluster on this machine (integration): a head with no CPUs and two 1-CPU
worker nodes, all on 127.0.0.1. Ray Train's two workers and the Serve app's Retriever and
Generator replicas must land on different nodes and still work together."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import REPO, _free_port
from tests.jobs.test_train import TINY_OVERRIDES
from tests.serve.conftest import rag_reference, tiny_documents, wait_ready

# A hang (a node or replica that never comes up) fails the test, and the fixture still shuts down.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

API_KEY = "multinode-key"


@pytest.fixture(scope="module")
def cluster():
    """Head (0 CPUs, dashboard for the State API and Serve's REST API) + nodes "a" and "b" (1 CPU
    each, tagged with custom resources node_a / node_b); always shut down, also on failure."""
    import ray
    import ray._private.ray_constants as ray_constants
    from ray.cluster_utils import Cluster

    from cluster.runtime import local_runtime_env

    # Cluster() writes its address to <ray temp dir>/ray_current_cluster, which `ray.init("auto")`
    # and `ray status` of anyone on this machine read: keep it, and the session, in a private dir.
    ray_tmp = tempfile.mkdtemp(prefix="raylm-mn-", dir="/tmp")  # short: Ray's socket paths are limited
    # The shared in-process cluster's users run before this module and stop it after the last
    # (tests/conftest.py); this cluster must not be joined to it.
    assert not ray.is_initialized(), "an earlier test left this process connected to Ray"
    dashboard_port = _free_port()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", ray_tmp)
        # The nodes' GCS listens on 127.0.0.1 only, but ray.init(address="127.0.0.1:<port>") (this
        # driver, and the dashboard's Serve REST module on the head) rewrites a loopback address to
        # the machine's outward IP and then waits for a GCS that is not there. This Ray switch
        # (named for Windows/macOS, read on Linux too) makes Ray resolve "this node" to 127.0.0.1:
        # the env var for the processes the nodes spawn, the constant for this already-imported Ray.
        mp.setenv(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, "0")
        mp.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
        c = Cluster(shutdown_at_exit=True)
        try:
            # Fixed Ray defaults (8265 dashboard, 52365 agent) may belong to another cluster here.
            c.add_node(num_cpus=0, node_ip_address="127.0.0.1", include_dashboard=True,
                       dashboard_host="127.0.0.1", dashboard_port=dashboard_port,
                       dashboard_agent_listen_port=_free_port())
            # Each node its own artifact cache, as on separate machines: what one node fetched or
            # wrote there is not what the other reads.
            caches = {n: Path(ray_tmp) / f"cache-{n}" for n in ("a", "b")}
            a = c.add_node(num_cpus=1, node_ip_address="127.0.0.1", resources={"node_a": 1},
                           env_vars={"RAYLM_CACHE": str(caches["a"])})
            b = c.add_node(num_cpus=1, node_ip_address="127.0.0.1", resources={"node_b": 1},
                           env_vars={"RAYLM_CACHE": str(caches["b"])})
            c.wait_for_nodes()
            runtime_env = local_runtime_env()
            runtime_env["env_vars"].pop("RAYLM_CACHE", None)  # the nodes' own, not the driver's
            ray.init(address=c.address, _node_ip_address="127.0.0.1", runtime_env=runtime_env)
            yield {"a": a.node_id, "b": b.node_id, "dashboard": f"http://127.0.0.1:{dashboard_port}",
                   "caches": caches}
        finally:
            ray.shutdown()
            c.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)


def test_train_workers_on_two_nodes_share_checkpoints(cluster, tiny_model_dir, tiny_text_file, tmp_path):
    from cluster.config import load_config
    from jobs.train import STATE_FILE, WORKERS_FILE, TrainConfig, main

    cfg = load_config(TrainConfig, "configs/train_lora_smoke.yaml", [
        f"model={tiny_model_dir}", f"data={tiny_text_file}", f"storage={tmp_path}", "name=multinode",
        "max_tokens=0", "num_workers=2", *TINY_OVERRIDES])
    out = main(cfg)  # init_ray() inside keeps the fixture's connection

    run = tmp_path / "runs" / "multinode"
    workers = [json.loads(line) for line in (run / WORKERS_FILE).read_text().splitlines()]
    assert sorted(w["rank"] for w in workers) == [0, 1] and {w["world"] for w in workers} == {2}
    nodes = {w["node_id"] for w in workers}
    assert len(nodes) == 2 and nodes <= {cluster["a"], cluster["b"]}, (workers, cluster)
    assert all(w["step"] == 0 for w in workers)
    # Rank 0 wrote each checkpoint from its node into the storage path every node sees; the
    # latest is always kept.
    checkpoints = sorted(p.name for p in run.glob("step_*"))
    assert checkpoints and checkpoints[-1] == "step_000004", checkpoints
    assert (run / "step_000004" / STATE_FILE).is_file() and (run / "step_000004" / "adapter_model.safetensors").is_file()
    assert out == tmp_path / "adapters" / "multinode"
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert json.loads((out / "manifest.json").read_text())["kind"] == "adapter"
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4


def _tiny_index(storage: Path, name: str) -> None:
    from ops.retrieval import DEFAULT_EMBEDDER, RetrievalStore, chunk_documents, embed, load_embedder

    chunks = chunk_documents(tiny_documents(), 1000, 100)
    embedder = load_embedder()
    store = RetrievalStore.build(chunks, embed(embedder, [c["text"] for c in chunks]), embedder_name=DEFAULT_EMBEDDER)
    store.save(storage / "indexes" / name)


def test_serve_retriever_and_generator_on_two_nodes(cluster, bucket, tiny_model_dir, tmp_path):
    """serve/config.yaml as `serve deploy` sends it, with each deployment pinned to a node through
    the config's per-deployment ray_actor_options (build_app itself is unchanged). The index is in
    the bucket: the retriever's node reads it into its own cache."""
    from ray import serve
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    from cluster.runtime import local_runtime_env

    from ops import artifacts

    _tiny_index(tmp_path, "tiny")
    with artifacts.publish(bucket, "indexes", "tiny") as out:
        shutil.copytree(tmp_path / "indexes" / "tiny", out, dirs_exist_ok=True)
    port = _free_port()
    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    config["http_options"].update(host="127.0.0.1", port=port)
    assert config["proxy_location"] == "HeadOnly"  # every node is 127.0.0.1: one proxy per node would clash
    (app,) = config["applications"]
    app["args"].update(storage=bucket, model=str(tiny_model_dir), model_id="tiny", index="tiny",
                       api_key=API_KEY, max_seq_len=512, num_threads=1, request_timeout_s=30,
                       compile=False)  # compiling costs a minute on 2 CPUs; tests/ops covers it
    # The Serve controller builds the app in its own task: give it this checkout's import path.
    app["runtime_env"]["env_vars"].update(local_runtime_env()["env_vars"])
    app["runtime_env"]["env_vars"].pop("RAYLM_CACHE", None)
    deployments = {d["name"]: d for d in app["deployments"]}
    deployments["Generator"].pop("autoscaling_config", None)
    deployments["Generator"]["num_replicas"] = 1
    deployments["Generator"]["ray_actor_options"]["resources"] = {"node_a": 1}
    deployments["Retriever"]["ray_actor_options"]["resources"] = {"node_b": 1}

    client = ServeSubmissionClient(cluster["dashboard"])
    client.deploy_applications(config)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, deadline_s=150)
        details = client.get_serve_details()["applications"]["rag"]["deployments"]
        where = {name: [r["node_id"] for r in details[name]["replicas"] if r["state"] == "RUNNING"]
                 for name in ("Generator", "Retriever")}
        assert where == {"Generator": [cluster["a"]], "Retriever": [cluster["b"]]}, (where, cluster)

        r = httpx.post(f"{base}/v1/rag", json={"question": "Who jumps over the lazy dog?", "top_k": 2,
                                               "max_tokens": 4}, headers={"Authorization": f"Bearer {API_KEY}"},
                       timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["sources"]) == 2 and all(s["text"] for s in body["sources"])
        # The generator on node a answers from the passages the retriever on node b found.
        want = rag_reference(tiny_model_dir, "Who jumps over the lazy dog?", body["sources"], 4, 512)
        assert body["answer"] == want["text"] and body["usage"]["completion_tokens"] == want["completion_tokens"]
        # Only the retriever's node fetched the index, into its own cache.
        fetched = {n: list(c.rglob("indexes/tiny/index.faiss")) for n, c in cluster["caches"].items()}
        assert fetched["b"] and not fetched["a"], fetched
    finally:
        serve.shutdown()
