"""Idle cost of a loopback Ray cluster with the shipped RAG app: CPU per process, Ray's defaults
against the interval settings this project starts its clusters with (`cluster.runtime.IDLE_ENV`).

Each setting runs in a child process of its own (Ray reads these variables when its processes
start): a local cluster bound to 127.0.0.1 with token auth, the app of serve/config.yaml
(`bench/served.py`, the index given by --index when it exists under --storage), --settle seconds
for start-up to finish, then every process's CPU time over --seconds of no traffic. Then a kill of
the Generator replica, timed until /healthz answers again: the fault recovery the settings must keep.

    python bench/idle_cost.py [--seconds 60] [--settle 30]

Writes docs/benchmarks/idle_cost.md and idle_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0, help="idle window measured")
    p.add_argument("--settle", type=float, default=30.0, help="seconds after the app is healthy before measuring")
    p.add_argument("--storage", default="./artifacts", help="artifact root (models, the index)")
    p.add_argument("--index", default="rag-latency-bench", help="index under <storage>/indexes/ (the one "
                   "bench/rag_latency.py builds); absent: the app runs without a Retriever")
    p.add_argument("--out", default="docs/benchmarks", help="folder for idle_cost.md / idle_cost.json")
    p.add_argument("--child", choices=["ray", "tuned"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def role(cmdline: list[str], name: str) -> str:
    """A short name for a Ray process: the actor class for workers, else the daemon."""
    text = " ".join(cmdline)
    if name.startswith("ray::"):
        return name.split("ray::", 1)[1].split(".")[0].split(" ")[0] or "worker"
    for daemon in ("gcs_server", "raylet", "dashboard_agent", "dashboard.py", "log_monitor", "monitor.py",
                   "runtime_env/agent"):
        if daemon in text:
            return daemon.removesuffix(".py")
    return name


def cpu_by_role(pids: set[int], seconds: float) -> dict[str, float]:
    """Percent of one core per process role over ``seconds`` (CPU time delta / wall time)."""
    import psutil

    def sample() -> dict[int, tuple[str, float]]:
        out = {}
        for proc in psutil.process_iter(["pid", "name", "cmdline", "cpu_times"]):
            if proc.info["pid"] in pids or any(part in " ".join(proc.info["cmdline"] or [])
                                                for part in ("ray::", "gcs_server", "raylet", "ray/dashboard",
                                                             "log_monitor", "ray/autoscaler")):
                t = proc.info["cpu_times"]
                name = "driver (this benchmark)" if proc.info["pid"] in pids else role(proc.info["cmdline"] or [],
                                                                                         proc.info["name"] or "")
                out[proc.info["pid"]] = (name, t.user + t.system)
        return out

    before, t0 = sample(), time.monotonic()
    time.sleep(seconds)
    after, wall = sample(), time.monotonic() - t0
    usage: dict[str, float] = defaultdict(float)
    for pid, (name, cpu) in after.items():
        usage[name] += 100.0 * (cpu - before.get(pid, (name, 0.0))[1]) / wall
    return dict(sorted(usage.items(), key=lambda kv: -kv[1]))


def recovery_s(url: str) -> float:
    """Kill the Generator replica's process; seconds until /healthz answers 200 again."""
    import httpx
    import psutil

    (victim,) = [p for p in psutil.process_iter(["cmdline"]) if "ServeReplica:rag:Generator" in " ".join(
        p.info["cmdline"] or [])]
    t0 = time.monotonic()
    victim.kill()
    time.sleep(0.5)  # the proxy may still answer from before the kill for a moment
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        if time.monotonic() - t0 > 300:
            raise TimeoutError("the Generator was not replaced within 300 s")
        time.sleep(0.2)  # poll interval


def child(args: argparse.Namespace) -> None:
    from cluster import runtime
    from served import served_app

    if args.child == "ray":
        for key in runtime.IDLE_ENV:
            os.environ.pop(key, None)
        os.environ["RAYLM_RAY_DEFAULTS"] = "1"  # init_ray leaves Ray's own intervals
    storage = Path(args.storage)
    index = args.index if (storage / "indexes" / args.index / "manifest.json").is_file() else None
    with served_app(storage, index) as (url, _):
        time.sleep(args.settle)
        usage = cpu_by_role({os.getpid()}, args.seconds)
        recovery = recovery_s(url)
    print(json.dumps({"setting": args.child, "index": index, "usage": usage, "total": sum(usage.values()),
                      "recovery_s": recovery}), flush=True)


def write(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "idle_cost.json").write_text(json.dumps(report, indent=2))
    rows = {r["setting"]: r for r in report["runs"]}
    roles = sorted({k for r in rows.values() for k in r["usage"]}, key=lambda k: -rows["ray"]["usage"].get(k, 0))
    lines = ["# Idle cost of the cluster and the RAG app", "",
             f"Generated by `{report['command']}` on {report['date']} ({report['machine']}, {report['cpus']} CPUs, "
             f"load average {report['load_at_start']:.2f} at start). A loopback cluster with token auth and the app of "
             f"serve/config.yaml (index `{rows['ray']['index']}`), no traffic: percent of one core per process over "
             f"{report['seconds']:.0f} s, {report['settle']:.0f} s after the app was healthy. Then the Generator "
             "replica's process is killed: seconds until `/healthz` answers again.", "",
             "Settings: **Ray defaults**; **this project** = `cluster.runtime.IDLE_ENV`, which `init_ray` and "
             "`make ray-up` apply before Ray starts: " + ", ".join(f"`{k}={v}`" for k, v in report["idle_env"].items())
             + ".", "",
             "| process | Ray defaults, % of a core | this project, % of a core |", "|---|---|---|"]
    for name in roles:
        lines.append(f"| {name} | {rows['ray']['usage'].get(name, 0):.1f} | {rows['tuned']['usage'].get(name, 0):.1f} |")
    lines += [f"| **all** | **{rows['ray']['total']:.1f}** | **{rows['tuned']['total']:.1f}** |", "",
              "| setting | Generator killed -> healthy again, s |", "|---|---|",
              f"| Ray defaults | {rows['ray']['recovery_s']:.1f} |", f"| this project | {rows['tuned']['recovery_s']:.1f} |"]
    (out / "idle_cost.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    args = parse_args()
    if args.child:
        child(args)
        return
    from cluster.runtime import IDLE_ENV

    load = os.getloadavg()[0]
    runs = []
    for setting in ("ray", "tuned"):
        argv = [sys.executable, __file__, f"--child={setting}", f"--seconds={args.seconds}",
                f"--settle={args.settle}", f"--storage={args.storage}", f"--index={args.index}"]
        proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise SystemExit(f"the {setting} run failed:\n{proc.stderr[-3000:]}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"[bench.idle_cost] {runs[-1]}", flush=True)
    report = {"command": " ".join(["python bench/idle_cost.py", *sys.argv[1:]]), "date": time.strftime(
              "%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.machine(), "cpus": os.cpu_count(),
              "load_at_start": load, "seconds": args.seconds, "settle": args.settle, "idle_env": IDLE_ENV,
              "runs": runs}
    write(REPO / args.out, report)
    print(f"[bench.idle_cost] wrote {REPO / args.out / 'idle_cost.md'}", flush=True)


if __name__ == "__main__":
    main()
