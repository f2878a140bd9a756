"""The RAG app as shipped, for benchmarks: serve/config.yaml's `args` on a loopback Ray cluster.

    with served_app(storage, index=None) as (url, headers):
        ...  # POST f"{url}/v1/chat/completions"

Ray starts in this process (token auth on, everything bound to 127.0.0.1) and stops on exit, also on
failure. Only `storage`, `index` and the keys in `overrides` differ from the shipped config, and the
benchmark reports name every override, so a row labelled "default config" is what `serve run
serve/config.yaml` serves.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "serve" / "config.yaml"


def shipped_args() -> dict[str, Any]:
    """The `args` of the rag application in serve/config.yaml."""
    (app,) = [a for a in yaml.safe_load(CONFIG.read_text())["applications"] if a["name"] == "rag"]
    return dict(app["args"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served_app(storage: Path, index: str | None, ready_timeout_s: float = 900.0,
               **overrides: Any) -> Iterator[tuple[str, dict[str, str]]]:
    """Deploys the shipped app args (plus ``overrides``) and yields (base URL, request headers)."""
    import httpx
    import ray
    from ray import serve

    from cluster.runtime import init_ray
    from serve.app import build_app

    args = {**shipped_args(), "storage": str(storage), "index": index, **overrides}
    port = _free_port()
    init_ray(num_cpus=2, dashboard_port=_free_port())
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name="rag", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + ready_timeout_s
        while True:  # ready = the Generator answers (with compile: after its graphs are built)
            try:
                if httpx.get(f"{url}/healthz", timeout=10).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the app was not healthy within {ready_timeout_s:.0f} s")
            time.sleep(0.5)
        yield url, {}
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
