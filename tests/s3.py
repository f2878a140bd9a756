"""A real S3 protocol server on loopback for the storage=s3://... tests (moto's threaded server).

The endpoint, keys and node-local cache are set in the environment when a test module imports
this, i.e. at collection, before any shared Ray cluster starts: Ray's processes inherit the
environment they start with, and ``cluster.runtime`` forwards these variables to workers.
The server itself starts on first use and stops at the end of the session.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from tests.conftest import _free_port

PORT = _free_port()
CACHE = Path(tempfile.mkdtemp(prefix="raylm-s3-cache-"))
os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{PORT}", AWS_ACCESS_KEY_ID="testing",
                  AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1", RAYLM_CACHE=str(CACHE))


@pytest.fixture(scope="session")
def s3_server():
    """The moto server at ``AWS_ENDPOINT_URL``; stopped after the session, also on failure."""
    moto_server = pytest.importorskip("moto.server", reason="needs moto[server] (the dev extra)")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=PORT, verbose=False)
    server.start()
    try:
        yield os.environ["AWS_ENDPOINT_URL"]
    finally:
        server.stop()
        shutil.rmtree(CACHE, ignore_errors=True)


@pytest.fixture
def bucket(s3_server) -> str:
    """``s3://<new bucket>/prefix``: a bucket of the test's own."""
    import boto3

    name = f"raylm-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}/prefix"


def keys(uri: str) -> list[str]:
    """Object keys under ``s3://bucket/prefix/...``, relative to that prefix (read with boto3, not our code)."""
    import boto3

    name, _, prefix = uri[len("s3://"):].partition("/")
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=name, Prefix=prefix + "/")
    # pyarrow marks directories with empty "<dir>/" objects: files only.
    return sorted(o["Key"][len(prefix) + 1:] for page in pages for o in page.get("Contents", [])
                  if not o["Key"].endswith("/"))


def empty_cache() -> None:
    """Empty this node's artifact cache, so what a test reads next must come from the bucket."""
    for entry in CACHE.iterdir():
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
