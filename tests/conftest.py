"""Shared fixtures: a tiny random Llama + tokenizer (unit tests), the embedded model's storage
(integration), and a loopback Ray cluster that is always shut down."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
# Converting the embedded GGUF takes ~20 s; tests share one converted copy across runs.
TEST_STORAGE = Path(os.environ.get("RAYLM_TEST_STORAGE", REPO / ".cache" / "test-artifacts"))


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
def embedded_storage() -> Path:
    """Storage holding the embedded model converted to safetensors (converted once, then reused)."""
    from ops.model import DEFAULT_MODEL, ensure_embedded

    TEST_STORAGE.mkdir(parents=True, exist_ok=True)
    ensure_embedded(DEFAULT_MODEL, TEST_STORAGE)
    return TEST_STORAGE


@pytest.fixture(scope="session")
def ray_local():
    """A loopback Ray instance for tests that need Ray Data / Train in-process; always shut down."""
    import ray

    from cluster.runtime import init_ray

    init_ray(num_cpus=2)
    try:
        yield ray
    finally:
        ray.shutdown()


def run_module(module: str, *args: str, env: dict | None = None, timeout: int = 600,
               cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run ``python -m module args...`` like a user would; returns the completed process."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
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
                    "RAY_ADDRESS": self.dashboard}
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
             f"--dashboard-agent-listen-port={self.agent_port}"],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2):
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


@pytest.fixture(scope="session")
def ray_head():
    """A loopback Ray head for `ray job submit` tests; always stopped, also on failure."""
    head = RayHead()
    head.start()
    try:
        yield head
    finally:
        head.stop()
