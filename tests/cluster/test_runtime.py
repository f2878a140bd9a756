"""cluster.runtime: the idle-interval settings a cluster starts with."""

import os
import runpy

from cluster import runtime


def test_idle_env_fills_what_is_unset_and_keeps_what_the_user_set(monkeypatch, capsys):
    for key in runtime.IDLE_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv(runtime.RAY_DEFAULTS_ENV, raising=False)
    monkeypatch.setenv("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.2")
    applied = runtime.apply_idle_env()
    assert applied == {**runtime.IDLE_ENV, "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.2"}
    assert float(runtime.IDLE_ENV["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"]) > 0.1  # slower than Ray's 10 Hz loop
    # `make ray-up` runs `env $(python -m cluster.runtime) ray start ...`
    runpy.run_module("cluster.runtime", run_name="__main__")
    assert capsys.readouterr().out.split() == [f"{k}={v}" for k, v in applied.items()]


def test_ray_defaults_switch_leaves_the_environment_alone(monkeypatch):
    for key in runtime.IDLE_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv(runtime.RAY_DEFAULTS_ENV, "1")
    assert runtime.apply_idle_env() == {}
    assert not any(key in os.environ for key in runtime.IDLE_ENV)
