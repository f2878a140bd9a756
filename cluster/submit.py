"""Submit a job to a Ray cluster the way ``ray job submit --working-dir .`` does, minus its traps.

    python -m cluster.submit [--address URL] [--no-wait] -- python -m jobs.evaluate name=x

It uploads this checkout without the virtualenv and artifacts, passes the directory you launch
from as ``RAYLM_LAUNCH_DIR`` so that a relative ``storage=`` lands there (not in the job's
temporary copy), streams the job's logs and exits with the job's status.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time

DEFAULT_ADDRESS = "http://127.0.0.1:8265"


def submit_with_retry(client, entrypoint: str, runtime_env: dict, wait_s: float = 120.0) -> str:
    """Submit, retrying while a just-started head has no job agent registered yet."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        split = argv.index("--")
        own, entrypoint = argv[:split], argv[split + 1:]
    else:
        own, entrypoint = argv, []
    parser = argparse.ArgumentParser(prog="python -m cluster.submit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default=os.environ.get("RAY_DASHBOARD_ADDRESS", DEFAULT_ADDRESS),
                        help="Ray dashboard (job server) address [%(default)s]")
    parser.add_argument("--no-wait", action="store_true", help="submit and return the job id without waiting")
    args = parser.parse_args(own)
    if not entrypoint:
        parser.error("give the job's command after `--`, e.g. -- python -m jobs.evaluate")

    from ray.job_submission import JobStatus, JobSubmissionClient

    from cluster.runtime import submit_runtime_env

    try:
        client = JobSubmissionClient(args.address)
        # Quoted so an argument with spaces (a question, a path) reaches the job as one argument.
        job_id = submit_with_retry(client, shlex.join(entrypoint), submit_runtime_env())
    except ConnectionError as exc:
        print(f"error: no Ray job server at {args.address} ({exc}); start one with `make ray-up`", file=sys.stderr)
        return 2
    except Exception as exc:
        if not _is_auth_error(exc):
            raise
        print(f"error: the job server at {args.address} refused this client's Ray auth token "
              f"({_first_line(exc)}); export RAY_AUTH_MODE=token and the cluster's token as RAY_AUTH_TOKEN "
              "or in ~/.ray/auth_token (`ray get-auth-token` on the head)", file=sys.stderr)
        return 2
    print(f"[submit] job {job_id} submitted to {args.address}", flush=True)
    if args.no_wait:
        return 0

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        print(f"\n[submit] stopped following; the job goes on (ray job stop {job_id})", file=sys.stderr)
        return 130
    status = client.get_job_status(job_id)
    while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        time.sleep(0.5)
        status = client.get_job_status(job_id)
    print(f"[submit] job {job_id} {status.value}", flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1


def _is_auth_error(exc: BaseException) -> bool:
    from ray.exceptions import AuthenticationError

    text = str(exc)
    return isinstance(exc, AuthenticationError) or "Authentication" in text or "authentication token" in text


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


if __name__ == "__main__":
    raise SystemExit(main())
