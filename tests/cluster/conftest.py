"""Fixtures of tests/cluster: the loopback S3 server is registered here once, so that every module
here shares one server (a fixture imported into two modules is two session fixtures, and the second
would try to bind the same port)."""

from tests.s3 import bucket, s3_server  # noqa: F401 (fixtures)
