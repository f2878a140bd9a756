"""ray_cluster.yaml passes the cluster-config schema of the installed Ray."""

import copy

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.conftest import REPO


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load((REPO / "ray_cluster.yaml").read_text())


def test_schema_and_ray_checks(config):
    validate_config(prepare_config(copy.deepcopy(config)))


def test_gpu_workers_and_project_install(config):
    gpu = [t for t in config["available_node_types"].values() if t.get("resources", {}).get("GPU")]
    assert gpu and gpu[0]["max_workers"] >= gpu[0]["min_workers"]
    # torch comes with the project on every node, before the workers build flash-attn against it
    assert any("pip install -q -e ." in c for c in config["setup_commands"])
    gpu_install = [c for c in config["worker_setup_commands"] if '".[gpu]"' in c]
    assert gpu_install and all("--no-build-isolation" in c for c in gpu_install)
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-port=8265" in start


def test_every_node_starts_with_token_auth(config):
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        start = [c for c in commands if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), start
    assert config["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    assert "echo 'export RAY_AUTH_MODE=token' >> ~/.bashrc" in config["setup_commands"]


def test_schema_rejects_a_typo(config):
    bad = copy.deepcopy(config)
    bad["max_wrokers"] = 3
    with pytest.raises(jsonschema.ValidationError, match=r"\('max_wrokers' was unexpected\)"):
        validate_config(prepare_config(bad))
