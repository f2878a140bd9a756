"""Shared fixtures and the test tiers.

Fixtures: a tiny random Llama + tokenizer (unit tests), the embedded model's storage, the
native ops (built once per session, required wherever a C++ compiler exists), and the Ray
clusters: one in-process cluster and one `ray start --head` (for `ray job submit`, and for the
entrypoints that tests run in a child process: they attach to it instead of starting a Ray each),
each started on first use with its own temp dir and ports and stopped as soon as the last test
that needs it has run.

Tiers (markers, see pyproject.toml): a test that starts Ray or Serve is `integration`, one that
runs a real entrypoint in a child process is `subprocess`, one that loads the real embedded model
or compiles is `slow`, one that needs CUDA is `gpu`. Markers that follow from a fixture are added
here; `make test-quick` runs what has none of them.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests start their own clusters: never attach to one a user has running.
os.environ.pop("RAY_ADDRESS", None)
# Token auth on, as in production, with a token of this test session's own (children inherit it).
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
os.environ.pop("RAY_AUTH_TOKEN_PATH", None)

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
# Converting the embedded GGUF takes ~20 s; tests share one converted copy across runs. Only
# models/ lives there: everything a test writes goes to a storage of the session's own.
MODEL_CACHE = Path(os.environ.get("RAYLM_TEST_STORAGE", REPO / ".cache" / "test-artifacts"))
# Ray's session dirs (logs, sockets) stay short: AF_UNIX socket paths are limited to 107 bytes.
RAY_TEMP_ROOT = Path(tempfile.mkdtemp(prefix="raylm-t-", dir="/tmp"))
# Clusters that entrypoints start in child processes keep their sessions here too, not in the
# machine-wide /tmp/ray that `ray start` / `ray status` of a user read.
os.environ["RAY_TMPDIR"] = str(RAY_TEMP_ROOT)

# Fixtures that start Ray, and the marker each implies.
_FIXTURE_MARKERS = {
    "ray_local": "integration",
    "ray_head": "integration",
    "rag_app": "integration",
    "embedded_storage": "slow",
}
# Run order of the tiers: unit tests first, then each cluster's users together, so a cluster
# starts once and stops before the next group (see pytest_runtest_teardown).
_GROUPS = ("ray_local", "ray_head")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for fixture, marker in _FIXTURE_MARKERS.items():
            if fixture in item.fixturenames and marker not in item.keywords:
                item.add_marker(marker)

    def group(item: pytest.Item) -> int:
        for i, fixture in enumerate(_GROUPS):
            if fixture in item.fixturenames:
                return i + 2
        if item.get_closest_marker("integration"):
            return len(_GROUPS) + 2
        return 1 if item.get_closest_marker("subprocess") or item.get_closest_marker("slow") else 0

    items.sort(key=group)  # stable: file order within a group


def shared_file(name: str) -> Path:
    """A file of ../shared/data, or skip: a fresh clone does not have it."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"shared data file {path} is absent (only present beside the project checkout)")
    return path


TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.\n"
    "To be, or not to be, that is the question. All that glitters is not gold.\n"
    "Python is a programming language that lets you work quickly and integrate systems more effectively.\n"
) * 8


def build_tiny_tokenizer(directory: Path):
    """A byte-level BPE tokenizer trained on a few sentences, with EOS/BOS/PAD and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TINY_TEXT], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fast.save_pretrained(directory)
    return fast


def build_tiny_llama(directory: Path, hidden: int = 64, layers: int = 2, seed: int = 0):
    """A random Llama (GQA, tied embeddings like SmolLM2) saved with its tokenizer in ``directory``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tiny_tokenizer(directory)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden + 16,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(directory)
    return model, tok


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tiny.txt"
    path.write_text(TINY_TEXT * 4)
    return path


@pytest.fixture(scope="session")
def embedded_storage(tmp_path_factory) -> Path:
    """A storage of this session whose models/ holds the embedded model as safetensors.

    The conversion is cached across runs in MODEL_CACHE; only models/ is shared with it, so what
    tests write (reports, quantized models) goes to the session's temp dir and nothing piles up.
    """
    from ops.model import DEFAULT_MODEL, ensure_embedded

    ensure_embedded(DEFAULT_MODEL, MODEL_CACHE)
    storage = tmp_path_factory.mktemp("embedded-storage")
    (storage / "models").symlink_to(MODEL_CACHE / "models", target_is_directory=True)
    return storage


def _compiler_available() -> bool:
    return shutil.which(os.environ.get("CXX", "c++")) is not None


@pytest.fixture(scope="session")
def native_ops():
    """The compiled raylm ops, built (or loaded from the build cache) once per session.

    Wherever a C++ compiler exists, and always under CI, the native backend is required: a build
    failure fails the tests that use the ops instead of turning them into skips. Where neither
    holds the tests skip, naming why.
    """
    from ops import native_build

    backend = native_build.backend()
    if "cpu" in backend.devices:
        return backend
    required = os.environ.get("CI", "").lower() in ("1", "true", "yes") or _compiler_available()
    if required and os.environ.get("RAYLM_OPS", "auto") != "reference":
        pytest.fail(f"the native ops are required here (a C++ compiler exists or CI is set) but are not active: "
                    f"{backend.reason}", pytrace=False)
    pytest.skip(f"native ops not built here: {backend.reason}")


class _LocalRay:
    """One in-process Ray cluster on loopback, with its own temp dir; started on first use."""

    def __init__(self) -> None:
        self.started = False

    def get(self):
        import ray

        from cluster.runtime import init_ray

        if not self.started:
            if ray.is_initialized():  # a test connected on its own: not ours to reuse
                ray.shutdown()
            # Ports of its own (the dashboard's default 8265 may be a user's `make ray-up` cluster).
            # Metrics reach the export endpoint every second (Ray's default is 10 s), so a scrape
            # test waits on them briefly.
            init_ray(num_cpus=2, _temp_dir=str(RAY_TEMP_ROOT / "local"), dashboard_port=_free_port(),
                     _system_config={"metrics_report_interval_ms": 1000})
            self.started = True
        return ray

    def stop(self) -> None:
        if self.started:  # never import Ray here unless it ran (the GPU check has no Ray)
            import ray

            try:
                from ray import serve

                serve.shutdown()
            finally:
                ray.shutdown()
                self.started = False


_LOCAL_RAY = _LocalRay()


@pytest.fixture(scope="session")
def ray_local():
    """The shared in-process Ray cluster (Ray Data / Train / Serve in this process).

    Its users run together (see pytest_collection_modifyitems) and it stops after the last one.
    """
    return _LOCAL_RAY.get()


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``python -m module args...`` in this process (as ``__main__``, argv and all) and return
    its exit code and output: the entrypoint's own argument parsing and error path, without the
    seconds a child process spends importing torch. For options and errors; jobs that do work run
    through `run_module` (marker `subprocess`)."""
    import contextlib
    import io
    import runpy
    import warnings

    out, err = io.StringIO(), io.StringIO()
    code = 0
    argv = sys.argv
    sys.argv = [module, *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            # runpy warns that the job module is already imported (tests import it): expected here.
            warnings.filterwarnings("ignore", category=RuntimeWarning, module="runpy")
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
        _fail_if_ray_started(module)
    return subprocess.CompletedProcess([module, *args], code, out.getvalue(), err.getvalue())


def _fail_if_ray_started(module: str) -> None:
    """An in-process entrypoint that got as far as starting Ray would leave a cluster behind."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized() and not _LOCAL_RAY.started:
        ray.shutdown()
        pytest.fail(f"`{module}` started Ray inside run_cli; run it with run_module (marker subprocess)")


def run_module(module: str, *args: str, env: dict | None = None, timeout: int = 600,
               cwd: Path = REPO, head: "RayHead | None" = None) -> subprocess.CompletedProcess:
    """Run ``python -m module args...`` like a user would; returns the completed process.

    With ``head`` the entrypoint attaches to that cluster (``RAY_ADDRESS``, as on a machine where
    `make ray-up` runs) instead of starting a local Ray of its own, which costs seconds per run.
    """
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **({"RAY_ADDRESS": head.address} if head else {}),
                **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    """A `ray start --head` cluster on loopback, as a user would start it."""

    def __init__(self, num_cpus: int = 2):
        self.port, self.dashboard_port, self.agent_port = _free_port(), _free_port(), _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        bin_dir = str(Path(sys.executable).parent)
        # Jobs run `python ...` through the head's PATH: make it this virtualenv's python.
        self.env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
                    "RAY_ADDRESS": self.dashboard,
                    # On SIGTERM `ray start --block` first asks the GCS to drain the node and waits up
                    # to 30 s for it (for Serve traffic on Kubernetes); stop() signals the GCS too, so
                    # that wait always ran out. A test head has nothing to drain.
                    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
        from cluster.runtime import IDLE_ENV

        # the intervals `make ray-up` starts a user's head with
        self.env.update({k: self.env.get(k, v) for k, v in IDLE_ENV.items()})
        self.env.pop("PYTHONPATH", None)
        self.ray = str(Path(bin_dir) / "ray")
        self.num_cpus = num_cpus

    def start(self) -> None:
        """``ray start --head --block`` in its own process group, so stopping it stops only this head."""
        import signal
        import time
        import urllib.request

        self.proc = subprocess.Popen(
            [self.ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
             f"--port={self.port}", f"--dashboard-port={self.dashboard_port}", f"--num-cpus={self.num_cpus}",
             "--disable-usage-stats", "--include-dashboard=true",
             # Not the default 52365: an in-process test cluster may hold it, and a head whose agent
             # cannot bind its HTTP port accepts no jobs.
             f"--dashboard-agent-listen-port={self.agent_port}", f"--temp-dir={RAY_TEMP_ROOT / 'head'}"],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                # Token auth is on: the job server answers 401 to a request without the token.
                probe = urllib.request.Request(f"{self.dashboard}/api/version",
                                               headers={"Authorization": f"Bearer {os.environ['RAY_AUTH_TOKEN']}"})
                with urllib.request.urlopen(probe, timeout=2):
                    break
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"ray start exited with {self.proc.returncode}")
                time.sleep(1)
        else:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise RuntimeError("the Ray head's job server did not come up within 180 s")
        # The job server answers before its agent registers; a first job proves both are ready.
        from ray.job_submission import JobStatus, JobSubmissionClient

        from cluster.submit import submit_with_retry

        try:
            client = JobSubmissionClient(self.dashboard)
            job = submit_with_retry(client, "true", {}, wait_s=max(1.0, deadline - time.time()))
            while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                time.sleep(0.5)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def submit(self, *entrypoint: str, raw: bool = False, working_dir: Path = REPO, timeout: int = 900,
               extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        """``ray job submit --working-dir`` (raw) or ``python -m cluster.submit`` with ``entrypoint``."""
        if raw:
            cmd = [self.ray, "job", "submit", "--address", self.dashboard, "--working-dir", str(working_dir),
                   *extra, "--", *entrypoint]
        else:
            cmd = [sys.executable, "-m", "cluster.submit", "--address", self.dashboard, "--", *entrypoint]
        return subprocess.run(cmd, cwd=working_dir, env=self.env, capture_output=True, text=True, timeout=timeout)


class _SharedHead:
    """The `ray start --head` cluster that job-submission tests share; started on first use."""

    def __init__(self) -> None:
        self.head: RayHead | None = None

    def get(self) -> RayHead:
        if self.head is None:
            # 4 logical CPUs on a 2-core machine: a Tune trial (trial_cpus 1 + one 1-CPU worker) spends
            # most of its time starting processes, so two at a time finish sooner than one after the
            # other; every job a test submits still fits this head.
            head = RayHead(num_cpus=4)
            head.start()
            self.head = head
        return self.head

    def stop(self) -> None:
        if self.head is not None:
            head, self.head = self.head, None
            head.stop()


_HEAD = _SharedHead()


@pytest.fixture(scope="session")
def ray_head() -> RayHead:
    """The shared loopback Ray head for `ray job submit` tests; stops after the last one."""
    return _HEAD.get()


_CLUSTERS = {"ray_local": _LOCAL_RAY, "ray_head": _HEAD}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    """Stops a shared cluster right after the last test that needs it (module fixtures that use
    it, such as a Serve app, have been torn down by then), also when that test failed."""
    yield
    for fixture, cluster in _CLUSTERS.items():
        if fixture in item.fixturenames and (nextitem is None or fixture not in nextitem.fixturenames):
            cluster.stop()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for cluster in _CLUSTERS.values():
        cluster.stop()
    shutil.rmtree(RAY_TEMP_ROOT, ignore_errors=True)
