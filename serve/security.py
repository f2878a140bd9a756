"""Who may call the app: a bearer API key, required whenever Serve listens beyond loopback.

Serve's HTTP proxy binds 127.0.0.1 unless told otherwise (``http_options.host`` in a Serve config,
``serve.start(http_options=...)``, the pipeline's ``serve.host``). An app whose proxy binds any
other address refuses to start without an API key; :func:`require_key_off_loopback` is that rule,
checked where the app is built and again in every ingress replica (the one place every way of
deploying passes through).
"""

from __future__ import annotations

import hmac
import ipaddress

from cluster.config import ConfigError

API_KEY_ENV = "RAYLM_API_KEY"


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` only accepts connections from this machine.

    ``None`` means Serve starts no HTTP proxy at all. A host name other than ``localhost`` counts as
    reachable: it may resolve to any interface.
    """
    if host is None:
        return True
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def require_key_off_loopback(host: str | None, api_key: str | None, where: str) -> None:
    """Refuse to serve on a non-loopback ``host`` without an API key.

    Args:
        host: The address the HTTP proxy binds.
        api_key: The key the app requires (empty or None: none).
        where: What set ``host``, for the message (e.g. "Serve's http_options.host").

    Raises:
        ConfigError: one line naming the host and the fix.
    """
    if not api_key and not is_loopback(host):
        raise ConfigError(f"{where} is {host!r}, which other machines can reach, and no API key is set; set the "
                          f"app's `api_key` arg or the {API_KEY_ENV} environment variable, or bind 127.0.0.1")


def serve_proxy_host() -> str | None:
    """The host the running Serve instance's HTTP proxies bind (None: Serve runs no proxy).

    Raises:
        LookupError: Ray is not connected in this process, or no Serve instance runs on the cluster.
    """
    import ray

    if not ray.is_initialized():
        raise LookupError("Ray is not initialized in this process")
    # Ray has no public getter for the HTTP options of a running instance (only the dashboard's REST
    # API shows them); serve.status() reads the controller through this same client.
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        raise LookupError("no Serve instance runs on this cluster")
    return client.http_config.host


def key_matches(authorization: str, api_key: str) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <api_key>``; compared in constant time."""
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())
