"""The Generator asks Ray for a GPU exactly when `use_gpu` says so: in the shipped YAMLs and in build_app.

No Ray is started: the YAMLs are read and checked against Serve's own schema, and the built
application is inspected as Serve would deploy it.
"""

from __future__ import annotations

import pytest
import yaml

from serve.app import build_app, generator_actor_options, parse_app_args, resolve_use_gpu
from tests.conftest import REPO


def _app_config(name: str) -> dict:
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((REPO / "serve" / name).read_text())
    validate = getattr(ServeDeploySchema, "model_validate", None) or ServeDeploySchema.parse_obj
    validate(config)  # Serve's own schema of a config file
    (app,) = config["applications"]
    return app


def _deployment(app: dict, name: str) -> dict:
    return next(d for d in app["deployments"] if d["name"] == name)


def test_shipped_gpu_yaml_gives_the_generator_a_gpu() -> None:
    app = _app_config("config.gpu.yaml")
    assert _deployment(app, "Generator")["ray_actor_options"]["num_gpus"] == 1
    args = parse_app_args(app["args"])
    assert args.use_gpu is True and args.dtype == "auto"


@pytest.mark.parametrize("name", ["config.yaml", "config.gpu.yaml"])
def test_shipped_yamls_ask_for_a_gpu_exactly_when_use_gpu_is_on(name: str) -> None:
    app = _app_config(name)
    use_gpu = parse_app_args(app["args"]).use_gpu
    assert use_gpu in (True, False), f"{name}: say use_gpu true or false; its deployments section fixes num_gpus"
    gpus = _deployment(app, "Generator")["ray_actor_options"].get("num_gpus", 0)
    assert (gpus >= 1) == use_gpu


def _generator_options(app) -> dict:
    """ray_actor_options of the Generator bound into the Ingress of a built application."""
    generator = app._bound_deployment.init_args[0]._bound_deployment
    assert generator.name == "Generator"
    return generator.ray_actor_options


@pytest.mark.parametrize("use_gpu, options", [(True, {"num_cpus": 1, "num_gpus": 1}), (False, {"num_cpus": 1})])
def test_build_app_sets_the_generator_gpu_request(tmp_path, use_gpu: bool, options: dict) -> None:
    app = build_app({"storage": str(tmp_path), "index": None, "use_gpu": use_gpu})
    assert _generator_options(app) == options
    assert generator_actor_options(use_gpu) == options


def test_use_gpu_auto_asks_the_running_cluster(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import ray

    import serve.app

    def no_serve() -> str:
        raise LookupError("no Serve instance runs on this cluster")

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 2.0})
    monkeypatch.setattr(serve.app, "serve_proxy_host", no_serve)  # the cluster is faked: no Serve to ask
    assert resolve_use_gpu("auto") == (True, "use_gpu=auto: the Ray cluster has 2 GPUs")
    assert _generator_options(build_app({"storage": str(tmp_path), "index": None}))["num_gpus"] == 1
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0})
    assert resolve_use_gpu("auto")[0] is False
    assert "num_gpus" not in _generator_options(build_app({"storage": str(tmp_path), "index": None}))


def test_use_gpu_auto_without_ray_counts_this_machines_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray
    import torch

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_use_gpu("auto") == (True, "use_gpu=auto: Ray is not running, this machine has 1 CUDA devices")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert resolve_use_gpu("auto")[0] is False
    assert resolve_use_gpu(False) == (False, "use_gpu=false")


def test_use_gpu_rejects_other_values() -> None:
    from cluster.config import ConfigError

    with pytest.raises(ConfigError, match="use_gpu"):
        parse_app_args({"use_gpu": "sometimes"})
