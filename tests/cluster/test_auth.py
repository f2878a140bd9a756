"""Ray token auth on the loopback head that `make ray-up` starts: without the session's token the
job server and the GCS refuse a client; with it, jobs run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.subprocess


def _env(head, token: str | None) -> dict[str, str]:
    env = {**head.env, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_AUTH_TOKEN", None)
    if token is not None:
        env["RAY_AUTH_TOKEN"] = token
    else:  # no token anywhere: not in the environment, not in a (fresh) home
        env["HOME"] = env["RAY_TMPDIR"] = os.environ["RAY_TMPDIR"] + "/no-token-home"
    return env


def _submit(head, token: str | None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.submit", "--address", head.dashboard, "--", "echo", "ran"],
                          cwd=REPO, env=_env(head, token), capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("token", ["0" * 64, None], ids=["wrong-token", "no-token"])
def test_job_server_refuses_a_client_without_the_token(ray_head, token) -> None:
    proc = _submit(ray_head, token)
    assert proc.returncode != 0
    assert "ran" not in proc.stdout
    out = proc.stdout + proc.stderr
    assert "token" in out.lower(), out[-2000:]


def test_gcs_refuses_a_driver_with_a_wrong_token(ray_head) -> None:
    code = ("import ray\n"
            f"ray.init(address={ray_head.address!r}, _node_ip_address='127.0.0.1')\n"
            "print('connected', ray.cluster_resources())\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(ray_head, "1" * 64), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "connected" not in proc.stdout
    assert "auth" in (proc.stdout + proc.stderr).lower()


def test_a_client_with_the_token_runs_a_job(ray_head) -> None:
    proc = _submit(ray_head, os.environ["RAY_AUTH_TOKEN"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ran" in proc.stdout
