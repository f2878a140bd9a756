"""The API key rule without Ray: loopback may go without a key, any other host may not."""

from __future__ import annotations

import pytest

from cluster.config import ConfigError
from serve import app as serve_app
from serve.security import is_loopback, key_matches, require_key_off_loopback


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.0.1.1", True), ("::1", True), ("[::1]", True), ("localhost", True), (None, True),
    ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("192.168.0.7", False), ("my-host.example", False),
])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_non_loopback_without_key_is_a_one_line_error_naming_the_fix():
    with pytest.raises(ConfigError) as err:
        require_key_off_loopback("0.0.0.0", None, "Serve's http_options.host")
    message = str(err.value)
    assert "'0.0.0.0'" in message and "`api_key`" in message and "RAYLM_API_KEY" in message
    assert "\n" not in message
    require_key_off_loopback("0.0.0.0", "a-key", "serve.host")  # a key: allowed
    require_key_off_loopback("127.0.0.1", None, "serve.host")  # loopback: allowed


def test_key_matches_only_the_bearer_token():
    assert key_matches("Bearer k3y", "k3y") and key_matches("bearer k3y", "k3y")
    assert not key_matches("Bearer k3", "k3y") and not key_matches("k3y", "k3y")
    assert not key_matches("Basic k3y", "k3y") and not key_matches("", "k3y")


def _ingress_key(app) -> str | None:
    """The API key the app's Ingress is bound with (its third init argument: the parsed args).
    Serve's Application has no public accessor for what a deployment was bound with."""
    key = app._bound_deployment.init_args[2]["api_key"]
    return None if key is None else key.get_secret_value()


def test_build_app_refuses_a_running_serve_on_all_interfaces_without_key(monkeypatch, tmp_path):
    monkeypatch.delenv("RAYLM_API_KEY", raising=False)
    monkeypatch.setattr(serve_app, "serve_proxy_host", lambda: "0.0.0.0")
    args = {"storage": str(tmp_path), "index": None}
    with pytest.raises(ConfigError, match="Serve's http_options.host is '0.0.0.0'.*RAYLM_API_KEY"):
        serve_app.build_app(args)
    assert _ingress_key(serve_app.build_app({**args, "api_key": "k"})) == "k"
    monkeypatch.setenv("RAYLM_API_KEY", "from-env")
    assert _ingress_key(serve_app.build_app(args)) == "from-env"


def test_build_app_without_a_running_serve_leaves_the_check_to_the_replica(monkeypatch, tmp_path):
    def no_serve() -> str:
        raise LookupError("no Serve instance runs on this cluster")

    monkeypatch.delenv("RAYLM_API_KEY", raising=False)
    monkeypatch.setattr(serve_app, "serve_proxy_host", no_serve)
    app = serve_app.build_app({"storage": str(tmp_path), "index": None})
    # Built without a key; the Ingress replica checks its host when it starts (next test).
    assert app._bound_deployment.name == "Ingress" and _ingress_key(app) is None


def test_ingress_replica_refuses_to_start_off_loopback_without_key(monkeypatch, tmp_path):
    # @serve.ingress subclasses our class with an async __init__: run ours on a bare instance.
    wrapper = serve_app.Ingress.func_or_class
    ours = wrapper.__mro__[1]
    monkeypatch.setattr(serve_app, "serve_proxy_host", lambda: "10.0.0.8")
    args = serve_app.parse_app_args({"storage": str(tmp_path), "index": None}).model_dump()
    with pytest.raises(ConfigError, match="'10.0.0.8', which other machines can reach"):
        ours.__init__(object.__new__(wrapper), None, None, args)
    keyed = serve_app.parse_app_args({"storage": str(tmp_path), "index": None, "api_key": "k"}).model_dump()
    ingress = object.__new__(wrapper)
    ours.__init__(ingress, None, None, keyed)
    assert ingress.args.api_key.get_secret_value() == "k"


def test_app_args_never_show_the_key(tmp_path):
    args = serve_app.parse_app_args({"storage": str(tmp_path), "api_key": "s3cret-value"})
    assert "s3cret-value" not in repr(args) and "s3cret-value" not in args.model_dump_json()
    assert args.api_key.get_secret_value() == "s3cret-value"
