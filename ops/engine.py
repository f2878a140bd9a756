"""Generation engine: continuous-batching, streaming decode over a loaded HF causal LM.

One background thread owns the model and runs the scheduler loop (admit -> prefill ->
decode_one_token -> sample -> emit); asyncio callers and plain scripts talk to it through
thread-safe queues. Llama-family models (Llama, Mistral, Qwen2/3, SmolLM) run through a
gpt-fast style forward over the HF submodules with a preallocated KV cache, so that
swapped-in linear layers, patched norms/MLPs and PEFT LoRA layers all still apply; any
other architecture falls back to the plain HF forward with one `DynamicCache` per request.
On a CUDA device the Llama-family forward is `ops.cuda_runner.CudaLlamaRunner` (CUDA graphs,
FlashAttention, the compiled ops in the hot path).
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import inspect
import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ops.attention import AttentionChoice
from ops.quantization import fuse_weight_only

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """Raised by `Engine.submit` when `max_queue` requests are already waiting."""


class EngineError(RuntimeError):
    """Raised to a request's consumer when the engine failed while serving it."""


@dataclass
class Request:
    """One generation request.

    Attributes:
        prompt: Raw text prompt, tokenized as-is (exactly one of `prompt`/`messages`).
        messages: Chat messages (`[{"role": ..., "content": ...}]`); the tokenizer's chat
            template is applied with the generation prompt appended.
        max_tokens: Upper bound on generated tokens.
        temperature: 0 means greedy; otherwise logits are divided by it before sampling.
        top_p: Nucleus sampling mass in (0, 1]; 1 disables it.
        top_k: Keep only the k most likely tokens; 0 disables it.
        seed: Seed of this request's own generator, so sampling is reproducible per request.
        stop: Stop strings; generation ends at the first one and it is not emitted.
        ignore_eos: Keep generating past EOS (benchmarks, equality tests).
    """

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("Request needs exactly one of prompt= or messages=")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if any(not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty, got {self.stop!r}")


@dataclass
class Completion:
    """Final result of a request.

    Attributes:
        text: Generated text, without stop string or special tokens.
        token_ids: Generated token ids (including a final EOS or stop-completing token).
        finish_reason: "stop" (EOS or stop string), "length" (max_tokens) or "cancelled".
        prompt_tokens: Number of prompt tokens.
        completion_tokens: Number of generated tokens.
        time_to_first_token_s: Seconds from submit to the first generated token.
        latency_s: Seconds from submit to the end of the request.
        tokens_per_s: Decode rate after the first token, (completion_tokens - 1) / decode time.
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float
    latency_s: float
    tokens_per_s: float


@dataclass
class Delta:
    """One streaming event: new text, and on the last event the `Completion`."""

    text: str
    completion: Completion | None = None


@dataclass
class EngineConfig:
    """Engine settings.

    Attributes:
        max_batch_size: Requests decoded together at most (rows of the KV cache).
        max_queue: Requests waiting for a free row at most; more raise `QueueFullError`.
        max_seq_len: Prompt + generated tokens per request at most (KV cache length).
        num_threads: `torch.set_num_threads` for the engine; None leaves torch's setting.
        single_stream_threads: Intra-op threads while exactly one request decodes; None = as
            `num_threads`. (With the OpenMP workers of the loading thread released, see
            `release_openmp_workers`, 2 threads beat 1 on 2 CPUs at batch 1 as well.)
        fuse_qkv: Concatenate q/k/v projections into one matmul when all three are plain
            `nn.Linear` (a snapshot of their weights is taken at engine creation), and q/k/v
            and SwiGLU gate/up when they are weight-only int4/int8 modules of one kind.
        force_hf_forward: Use the plain HF forward even for Llama-family models.
        compile: `torch.compile` the decode step of the Llama-family forward (Inductor; on CPU
            with its C++ wrapper), so the per-layer Python and the small ops between the
            matmuls become one generated graph. Two graphs are compiled at engine start (one
            request / several), which takes tens of seconds per graph on a small CPU the first
            time (Inductor caches them on disk). Ignored, with a warning, by the HF fallback, and
            on a CUDA device, whose decode step is captured in CUDA graphs instead (`cuda_graphs`).
        cuda_graphs: On a CUDA device, capture the Llama-family decode step in one CUDA graph per
            batch bucket at warm-up (`ops.cuda_runner`); False decodes eagerly there.
    """

    max_batch_size: int = 8
    max_queue: int = 64
    max_seq_len: int = 2048
    num_threads: int | None = None
    single_stream_threads: int | None = None
    fuse_qkv: bool = True
    force_hf_forward: bool = False
    compile: bool = False
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        if self.single_stream_threads is not None and self.single_stream_threads < 1:
            raise ValueError(f"single_stream_threads must be >= 1 or None, got {self.single_stream_threads}")
        for name in ("max_batch_size", "max_queue", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


# --------------------------------------------------------------------------- model runners


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _fast_norm(norm: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """`F.rms_norm` (one op instead of HF's eight) for an unpatched float32 HF RMSNorm, else the module."""
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", None)
    if (
        not type(norm).__name__.endswith("RMSNorm")
        or "forward" in vars(norm)  # patched: the compiled op runs
        or not isinstance(eps, float)
        or not isinstance(weight, torch.Tensor)
        or weight.dim() != 1
        or weight.dtype != torch.float32
    ):
        return norm
    shape = (weight.shape[0],)
    return lambda x: F.rms_norm(x, shape, weight, eps) if x.dtype == torch.float32 else norm(x)


class LlamaRunner:
    """gpt-fast style forward of a Llama-family HF model with a static KV cache.

    The cache has one row per running request; rows 0..n-1 are the running ones (the
    scheduler compacts them with `move`), so decode works on contiguous views.
    """

    def __init__(self, model: nn.Module, max_batch_size: int, max_seq_len: int, fuse_qkv: bool,
                 compile: bool = False):
        self.model = model
        inner = model.model
        cfg = model.config
        self.embed_tokens = inner.embed_tokens
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.rotary_emb = inner.rotary_emb
        self.lm_head = model.lm_head
        self.n_head = cfg.num_attention_heads
        self.n_kv_head = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.max_seq_len = max_seq_len
        param = next(model.parameters())
        shape = (max_batch_size, self.n_kv_head, max_seq_len, self.head_dim)
        # (B_max, n_kv, T_max, hs) per layer
        self.k_cache = [torch.zeros(shape, dtype=param.dtype, device=param.device) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=param.dtype, device=param.device) for _ in self.layers]
        self.qkv = [self._fused_qkv(layer.self_attn) if fuse_qkv else None for layer in self.layers]
        self.gate_up = [self._fused_gate_up(layer.mlp) if fuse_qkv else None for layer in self.layers]
        self.norms = [(_fast_norm(layer.input_layernorm), _fast_norm(layer.post_attention_layernorm))
                      for layer in self.layers]
        self.final_norm = _fast_norm(self.norm)
        self.attention = AttentionChoice("sdpa", f"torch SDPA over the KV cache on {param.device.type}")
        self.compiled = compile
        self._step = self._decode
        if compile:
            # dynamic: the attended length T (and the batch size above 1) are symbols, not one graph each
            options = {"cpp_wrapper": True} if param.device.type == "cpu" else {}
            self._step = torch.compile(self._decode, dynamic=True, fullgraph=True, options=options)

    @staticmethod
    def _fused_qkv(attn: nn.Module) -> nn.Module | None:
        projs = (attn.q_proj, attn.k_proj, attn.v_proj)
        if any(type(p) is not nn.Linear for p in projs):
            return fuse_weight_only(list(projs))  # None for LoRA / other modules: own forward
        weight = torch.cat([p.weight for p in projs])
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=projs[0].bias is not None)
        fused.to(weight.device, weight.dtype)
        with torch.no_grad():
            fused.weight.copy_(weight)
            if fused.bias is not None:
                fused.bias.copy_(torch.cat([p.bias for p in projs]))
        return fused

    @staticmethod
    def _fused_gate_up(mlp: nn.Module) -> nn.Module | None:
        """gate/up as one weight-only matmul, for an unpatched SwiGLU MLP (else the MLP's forward runs).

        Plain `nn.Linear` gate/up are not fused: the float matmul dominates there and a
        snapshot would double the MLP weights in memory.
        """
        act = getattr(mlp, "act_fn", None)
        is_silu = isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"
        projs = ("gate_proj", "up_proj", "down_proj")
        if not is_silu or "forward" in vars(mlp) or not all(hasattr(mlp, n) for n in projs):
            return None
        return fuse_weight_only([mlp.gate_proj, mlp.up_proj])

    def _mlp(self, i: int, x: torch.Tensor) -> torch.Tensor:
        mlp = self.layers[i].mlp
        if self.gate_up[i] is None:
            return mlp(x)
        gate, up = self.gate_up[i](x).chunk(2, dim=-1)
        return mlp.down_proj(F.silu(gate) * up)

    def _qkv(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn = self.layers[i].self_attn
        if self.qkv[i] is not None:
            q_dim = self.n_head * self.head_dim
            kv_dim = self.n_kv_head * self.head_dim
            return self.qkv[i](x).split([q_dim, kv_dim, kv_dim], dim=-1)
        return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)

    def _heads(
        self, i: int, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projects q/k/v and rotates q/k.

        Args:
            x: (B, T, C) normalized hidden states.
            rope: cos and sin, each (B, 1, T, hs).

        Returns:
            q (B, nh, T, hs), k and v (B, n_kv, T, hs).
        """
        attn = self.layers[i].self_attn
        B, T, _ = x.shape
        cos, sin = rope
        if self.qkv[i] is not None and not hasattr(attn, "q_norm"):
            # rotate q and k heads together: one set of RoPE ops instead of two
            qkv = self.qkv[i](x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh + 2 n_kv, T, hs)
            qk, v = qkv.split([self.n_head + self.n_kv_head, self.n_kv_head], dim=1)
            qk = qk * cos + _rotate_half(qk) * sin
            q, k = qk.split([self.n_head, self.n_kv_head], dim=1)
            return q, k, v
        q, k, v = self._qkv(i, x)
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if hasattr(attn, "q_norm"):  # Qwen3 normalizes each head before RoPE
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return q, k, v

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rotary_emb(x, positions)  # (B, T, hs)
        return cos.unsqueeze(1), sin.unsqueeze(1)

    @torch.inference_mode()
    def prefill(self, row: int, input_ids: torch.Tensor) -> torch.Tensor:
        """Runs a prompt into cache row `row`.

        Args:
            row: KV cache row of the request.
            input_ids: (T,) prompt token ids.

        Returns:
            (V,) logits of the last prompt position.
        """
        T = input_ids.shape[0]
        x = self.embed_tokens(input_ids[None])  # (1, T, C)
        positions = torch.arange(T, device=x.device)[None]
        rope = self._rope(x, positions)
        n_rep = self.n_head // self.n_kv_head
        for i, layer in enumerate(self.layers):
            h = layer.input_layernorm(x)
            q, k, v = self._heads(i, h, rope)
            self.k_cache[i][row, :, :T] = k[0]
            self.v_cache[i][row, :, :T] = v[0]
            k = k.repeat_interleave(n_rep, dim=1)  # (1, nh, T, hs)
            v = v.repeat_interleave(n_rep, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=layer.self_attn.scaling)
            y = y.transpose(1, 2).reshape(1, T, -1)
            x = x + layer.self_attn.o_proj(y)
            x = x + self._mlp(i, layer.post_attention_layernorm(x))
        x = self.norm(x[:, -1:])
        return self.lm_head(x)[0, -1].float()

    @torch.inference_mode()
    def decode_one_token(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feeds one token per running request (rows 0..B-1).

        Args:
            tokens: (B,) last token of each request.
            positions: (B,) position of that token (= its KV cache index).

        Returns:
            (B, V) next-token logits.
        """
        T = int(positions.max()) + 1  # attend only over the filled part of the cache
        # every row at the last position (always at batch 1): no mask. Compiled, several rows always
        # take the masked path, so that two graphs (1 row / several) cover every step.
        uniform = tokens.shape[0] == 1 or (not self.compiled and int(positions.min()) + 1 == T)
        return self._step(tokens, positions, T, uniform)

    def warmup(self, set_threads: Callable[[int], None] = lambda batch: None) -> None:
        """Compiles the decode graphs now (the first step of each would otherwise take that long).

        Args:
            set_threads: Called with the batch size before each graph, so that it is compiled
                under the intra-op threads it will run with.

        Writes only cache positions 1..2 of rows 0..1, which a request's prefill overwrites.
        """
        if not self.compiled:
            return
        device = self.k_cache[0].device
        max_batch, max_len = self.k_cache[0].shape[0], self.k_cache[0].shape[2]
        for B in (1, 2) if max_batch > 1 and max_len > 2 else (1,):
            set_threads(B)
            started = time.perf_counter()
            positions = torch.arange(1, B + 1, device=device)
            self.decode_one_token(torch.zeros(B, dtype=torch.long, device=device), positions)
            log.info("compiled the decode step for %s in %.1f s", "1 request" if B == 1 else "batches",
                     time.perf_counter() - started)

    def _decode(self, tokens: torch.Tensor, positions: torch.Tensor, T: int, uniform: bool) -> torch.Tensor:
        B = tokens.shape[0]
        rows = torch.arange(B, device=tokens.device)
        mask = None
        if not uniform:
            # (B, 1, 1, T): row b sees cache positions 0..positions[b]; additive, built once per step
            visible = (torch.arange(T, device=tokens.device)[None, :] <= positions[:, None])[:, None, None, :]
            mask = torch.zeros(visible.shape, dtype=self.k_cache[0].dtype, device=tokens.device)
            mask.masked_fill_(~visible, float("-inf"))
        x = self.embed_tokens(tokens[:, None])  # (B, 1, C)
        rope = self._rope(x, positions[:, None])
        n_rep = self.n_head // self.n_kv_head
        for i, layer in enumerate(self.layers):
            input_norm, post_attention_norm = self.norms[i]
            q, k, v = self._heads(i, input_norm(x), rope)
            k_cache, v_cache = self.k_cache[i], self.v_cache[i]
            if mask is None:  # one position for all rows: no index_put
                k_cache[:B].index_copy_(2, positions[:1], k)
                v_cache[:B].index_copy_(2, positions[:1], v)
            else:
                k_cache[rows, :, positions] = k[:, :, 0]
                v_cache[rows, :, positions] = v[:, :, 0]
            # GQA without repeat_kv: the n_rep query heads of a kv head act as its query length
            q = q.view(B, self.n_kv_head, n_rep, self.head_dim)  # (B, n_kv, n_rep, hs)
            y = F.scaled_dot_product_attention(
                q, k_cache[:B, :, :T], v_cache[:B, :, :T], attn_mask=mask, scale=layer.self_attn.scaling
            )
            x = x + layer.self_attn.o_proj(y.reshape(B, 1, -1))
            x = x + self._mlp(i, post_attention_norm(x))
        return self.lm_head(self.final_norm(x))[:, 0].float()

    def move(self, src: int, dst: int, length: int) -> None:
        """Copies the first `length` cache positions of row `src` into row `dst`."""
        for k_cache, v_cache in zip(self.k_cache, self.v_cache):
            k_cache[dst, :, :length] = k_cache[src, :, :length]
            v_cache[dst, :, :length] = v_cache[src, :, :length]


class HFRunner:
    """Fallback for non-Llama architectures: plain HF forward, one `DynamicCache` per request.

    Rows are decoded one after the other, so there is no batching speed-up, but any causal
    LM that supports `past_key_values` works and produces exactly `generate`'s tokens.
    """

    def __init__(self, model: nn.Module, max_batch_size: int, max_seq_len: int):
        self.model = model
        self.max_seq_len = max_seq_len
        self.caches: list[Any] = [None] * max_batch_size
        # transformers renamed `past_key_values` to `cache` in 5.x
        params = inspect.signature(model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"

    @torch.inference_mode()
    def prefill(self, row: int, input_ids: torch.Tensor) -> torch.Tensor:
        """Returns (V,) logits of the last prompt position of `input_ids` (T,)."""
        out = self.model(input_ids=input_ids[None], use_cache=True)
        self.caches[row] = out.past_key_values
        return out.logits[0, -1].float()

    @torch.inference_mode()
    def decode_one_token(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Returns (B, V) logits for tokens (B,) at positions (B,) of rows 0..B-1."""
        logits = []
        for row in range(tokens.shape[0]):
            out = self.model(
                input_ids=tokens[row, None, None],
                **{self.cache_kwarg: self.caches[row]},
                position_ids=positions[row, None, None],
                use_cache=True,
            )
            self.caches[row] = out.past_key_values
            logits.append(out.logits[0, -1].float())
        return torch.stack(logits)

    def move(self, src: int, dst: int, length: int) -> None:
        """Moves the cache of row `src` to row `dst`."""
        self.caches[dst], self.caches[src] = self.caches[src], None


def _is_llama_family(model: nn.Module, max_seq_len: int) -> bool:
    cfg = model.config
    if getattr(cfg, "model_type", None) not in LLAMA_FAMILY:
        return False
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    if window is not None and window < max_seq_len:
        return False  # the static cache has no sliding-window mask
    inner = getattr(model, "model", None)
    return all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")) and hasattr(
        model, "lm_head"
    )


# --------------------------------------------------------------------------- sampling


def sample(logits: torch.Tensor, request: Request, generator: torch.Generator | None) -> int:
    """Picks the next token of one request.

    Args:
        logits: (V,) float32 next-token logits.
        request: Sampling parameters.
        generator: The request's seeded generator (unused for greedy).

    Returns:
        The token id.
    """
    if request.temperature == 0:
        return int(logits.argmax())
    logits = logits / request.temperature
    if request.top_k:
        kth = torch.topk(logits, min(request.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if request.top_p < 1:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > request.top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


# --------------------------------------------------------------------------- scheduler


_ids = itertools.count()


@dataclass
class _Sequence:
    """Scheduler state of one request."""

    request: Request
    prompt_ids: list[int]
    on_event: Callable[[Delta | BaseException], None]
    submitted: float
    generator: torch.Generator | None
    request_id: int = field(default_factory=lambda: next(_ids))
    token_ids: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of text already sent
    text: str = ""
    first_token_at: float = 0.0
    cancelled: bool = False
    finish_reason: str | None = None

    @property
    def position(self) -> int:
        """KV cache index of the last token (the next one fed to the model)."""
        return len(self.prompt_ids) + len(self.token_ids) - 1


class Engine:
    """Continuous-batching generation engine over a loaded HF causal LM.

    Usage from asyncio::

        engine = Engine(model, tokenizer, EngineConfig(max_batch_size=8))
        async for delta in engine.stream(Request(messages=[...])):
            ...                      # delta.text; the last delta carries .completion
        completion = await engine.generate(Request(prompt="..."))

    and from scripts: `engine.generate_sync([...])` / `for d in engine.stream_sync(req)`.
    The first request starts the background thread; `close()` (or `with Engine(...)`) stops it.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, config: EngineConfig | None = None):
        cfg = config or EngineConfig()
        if hasattr(model, "get_base_model"):  # PEFT: LoRA layers stay in place and apply
            model = model.get_base_model()
        self.model = model.eval()
        self.tokenizer = tokenizer
        max_pos = getattr(model.config, "max_position_embeddings", None)
        if max_pos is not None and cfg.max_seq_len > max_pos:
            cfg = dataclasses.replace(cfg, max_seq_len=max_pos)
        self.config = cfg
        self.device = next(model.parameters()).device
        if not cfg.force_hf_forward and _is_llama_family(model, cfg.max_seq_len) and self.device.type == "cuda":
            from ops.cuda_runner import CudaLlamaRunner  # imports this module: load it only when used

            if cfg.compile:
                log.info("EngineConfig.compile is not used on CUDA: the decode step is captured in CUDA graphs")
            self.runner: LlamaRunner | HFRunner = CudaLlamaRunner(
                model, cfg.max_batch_size, cfg.max_seq_len, cfg.fuse_qkv, cfg.cuda_graphs
            )
        elif not cfg.force_hf_forward and _is_llama_family(model, cfg.max_seq_len):
            self.runner = LlamaRunner(model, cfg.max_batch_size, cfg.max_seq_len, cfg.fuse_qkv, cfg.compile)
        else:
            if cfg.compile:
                log.warning("EngineConfig.compile ignored: %s runs through the plain HF forward",
                            type(model).__name__)
            self.runner = HFRunner(model, cfg.max_batch_size, cfg.max_seq_len)
        self.eos_token_ids = self._eos_ids(model, tokenizer)
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []  # index == KV cache row
        self._by_id: dict[int, _Sequence] = {}  # unfinished requests, for cancel() from any thread
        self._wakeup = threading.Condition()
        self._ready = threading.Event()  # set by the engine thread once warm (decode graphs compiled)
        self.warmup_error: BaseException | None = None  # why compiling failed
        self._thread: threading.Thread | None = None
        self._closed = False
        self._threads = cfg.num_threads or torch.get_num_threads()  # intra-op threads of prefill / batches
        release_openmp_workers()  # this thread loaded the model: its idle OpenMP team would slow decode

    @property
    def backend(self) -> str:
        """"llama" (own forward with static KV cache) or "hf" (plain HF forward)."""
        return "llama" if isinstance(self.runner, LlamaRunner) else "hf"

    @property
    def attention(self) -> AttentionChoice | None:
        """The attention the engine's own Llama-family forward runs; None: the HF forward's own."""
        return getattr(self.runner, "attention", None)

    @property
    def num_running(self) -> int:
        """Requests currently holding a KV cache row."""
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        """Requests queued for a free row."""
        return len(self._waiting)

    @staticmethod
    def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(model, "generation_config", None), model.config, tokenizer):
            eos = getattr(source, "eos_token_id", None)
            if eos is not None:
                ids.update([eos] if isinstance(eos, int) else eos)
        return ids

    # ----------------------------------------------------------------- public API

    def encode(self, request: Request) -> list[int]:
        """Tokenizes a request's prompt (applying the chat template to `messages`)."""
        if request.messages is not None:
            text = self.tokenizer.apply_chat_template(
                request.messages, add_generation_prompt=True, tokenize=False
            )
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(request.prompt)["input_ids"]

    def submit(self, request: Request, on_event: Callable[[Delta | BaseException], None]) -> int:
        """Queues a request; `on_event` is called from the engine thread for every event.

        Returns:
            The request id (for `cancel`).

        Raises:
            QueueFullError: `max_queue` requests are already waiting.
            ValueError: The prompt plus `max_tokens` exceeds `max_seq_len`, or is empty.
        """
        if self._closed:
            raise EngineError("engine is closed")
        prompt_ids = self.encode(request)
        if not prompt_ids:
            raise ValueError("prompt encodes to zero tokens")
        if len(prompt_ids) + request.max_tokens > self.config.max_seq_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({request.max_tokens}) exceeds "
                f"max_seq_len={self.config.max_seq_len}"
            )
        generator = None
        if request.temperature > 0:
            generator = torch.Generator(device=self.device)
            if request.seed is None:
                generator.seed()
            else:
                generator.manual_seed(request.seed)
        seq = _Sequence(request, prompt_ids, on_event, time.perf_counter(), generator)
        with self._wakeup:
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFullError(
                    f"{len(self._waiting)} requests already waiting (max_queue={self.config.max_queue})"
                )
            self._waiting.append(seq)
            self._by_id[seq.request_id] = seq
            self._wakeup.notify()
        self.start()
        return seq.request_id

    def cancel(self, request_id: int) -> None:
        """Cancels a request; its row is freed at the next engine step."""
        seq = self._by_id.get(request_id)
        if seq is not None:
            seq.cancelled = True

    def stream(self, request: Request) -> AsyncIterator[Delta]:
        """Submits a request now and returns an async iterator over its `Delta`s.

        Closing or cancelling the iterator (client went away) cancels the request.

        Raises:
            QueueFullError: immediately, so a server can answer 503 before streaming.
        """
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Delta | BaseException] = asyncio.Queue()
        request_id = self.submit(request, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        return self._aiter(request_id, events)

    async def _aiter(self, request_id: int, events: asyncio.Queue) -> AsyncIterator[Delta]:
        done = False
        try:
            while not done:
                event = await events.get()
                if isinstance(event, BaseException):
                    raise EngineError(str(event)) from event
                done = event.completion is not None
                yield event
        finally:
            if not done:
                self.cancel(request_id)

    async def generate(self, request: Request) -> Completion:
        """Runs a request to completion and returns its `Completion`."""
        async for delta in self.stream(request):
            if delta.completion is not None:
                return delta.completion
        raise EngineError("stream ended without a completion")

    def stream_sync(self, request: Request) -> Iterator[Delta]:
        """Synchronous `stream` for scripts: submits now, yields `Delta`s."""
        events: queue.Queue[Delta | BaseException] = queue.Queue()
        request_id = self.submit(request, events.put)
        return self._iter(request_id, events)

    def _iter(self, request_id: int, events: queue.Queue) -> Iterator[Delta]:
        done = False
        try:
            while not done:
                event = events.get()
                if isinstance(event, BaseException):
                    raise EngineError(str(event)) from event
                done = event.completion is not None
                yield event
        finally:
            if not done:
                self.cancel(request_id)

    def generate_sync(self, requests: Sequence[Request]) -> list[Completion]:
        """Runs requests concurrently (continuous batching) and returns their completions."""
        streams = [self.stream_sync(r) for r in requests]
        return [[d for d in s][-1].completion for s in streams]

    def start(self) -> None:
        """Starts the background decode thread (idempotent)."""
        with self._wakeup:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="engine-decode", daemon=True)
                self._thread.start()

    def warmup(self, timeout: float | None = None) -> None:
        """Starts the engine and waits until it is warm: with `compile`, its decode graphs are built.

        Without it, this only starts the thread. Requests submitted earlier simply wait. If
        compiling fails, the error is logged, kept in `warmup_error`, and the engine decodes with
        the eager forward (`compiled` is then False).

        Raises:
            EngineError: The engine was not warm within `timeout` seconds.
        """
        self.start()
        if not self._ready.wait(timeout):
            raise EngineError(f"engine not warm after {timeout} s")

    @property
    def compiled(self) -> bool:
        """Whether decode steps run compiled: torch.compile's graphs (CPU) or captured CUDA graphs."""
        return isinstance(self.runner, LlamaRunner) and self.runner.compiled

    def close(self) -> None:
        """Stops the decode thread; running and waiting requests end as cancelled."""
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- engine thread

    def _decode_threads(self, batch: int) -> int:
        single = self.config.single_stream_threads
        return single if single is not None and batch == 1 else self._threads

    def _warm(self) -> None:
        try:
            if isinstance(self.runner, LlamaRunner):
                self.runner.warmup(lambda batch: _set_threads(self._decode_threads(batch)))
        except Exception as exc:  # noqa: BLE001 - serve eagerly rather than not at all
            log.exception("compiling the decode step failed; decoding eagerly")
            self.warmup_error = exc
            self.runner._step = self.runner._decode
            self.runner.compiled = False
        finally:
            self._ready.set()

    def _loop(self) -> None:
        if self.config.num_threads is not None:
            torch.set_num_threads(self.config.num_threads)
        self._warm()
        while True:
            with self._wakeup:
                while not self._closed and not self._waiting and not self._running:
                    self._wakeup.wait()
                closed = self._closed
            if closed:
                for seq in self._drain_waiting():
                    self._finish(seq, "cancelled")
                for seq in self._running:
                    seq.cancelled = True
                self._retire()
                return
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - delivered to every affected client
                for seq in itertools.chain(self._running, self._drain_waiting()):
                    self._by_id.pop(seq.request_id, None)
                    seq.on_event(exc)
                self._running.clear()

    def _drain_waiting(self) -> list[_Sequence]:
        with self._wakeup:
            seqs = list(self._waiting)
            self._waiting.clear()
        return seqs

    def step(self) -> None:
        """One scheduler iteration: admit + prefill waiting requests, decode one token for all."""
        self._retire()
        while len(self._running) < self.config.max_batch_size:
            with self._wakeup:
                if not self._waiting:
                    break
                seq = self._waiting.popleft()
            if seq.cancelled:
                self._finish(seq, "cancelled")
                continue
            _set_threads(self._threads)
            row = len(self._running)
            self._running.append(seq)
            ids = torch.tensor(seq.prompt_ids, device=self.device)
            logits = self.runner.prefill(row, ids)
            self._accept(seq, sample(logits, seq.request, seq.generator))
        self._retire()
        if not self._running:
            return
        _set_threads(self._decode_threads(len(self._running)))
        tokens = torch.tensor([s.token_ids[-1] for s in self._running], device=self.device)
        positions = torch.tensor([s.position for s in self._running], device=self.device)
        logits = self.runner.decode_one_token(tokens, positions)  # (B, V)
        greedy = logits.argmax(-1).tolist()
        for b, seq in enumerate(self._running):
            token = greedy[b] if seq.request.temperature == 0 else sample(logits[b], seq.request, seq.generator)
            self._accept(seq, token)

    def _accept(self, seq: _Sequence, token: int) -> None:
        """Appends a token, emits the text that is safe to emit, and sets `finish_reason`."""
        now = time.perf_counter()
        if not seq.token_ids:
            seq.first_token_at = now
        seq.token_ids.append(token)
        request = seq.request
        is_eos = token in self.eos_token_ids and not request.ignore_eos
        text_ids = seq.token_ids[:-1] if is_eos else seq.token_ids
        seq.text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
        end = len(seq.text)
        stops = [i for i in (seq.text.find(s) for s in request.stop) if i >= 0]
        if stops:
            end, seq.finish_reason = min(stops), "stop"
        elif is_eos:
            seq.finish_reason = "stop"
        elif len(seq.token_ids) >= request.max_tokens:
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            seq.text = seq.text[:end]  # the rest is sent with the completion by _finish
            return
        if seq.text.endswith("\ufffd"):  # incomplete UTF-8 character: wait for its bytes
            return
        # hold back a tail that may still grow into a stop string
        end -= _stop_prefix_len(seq.text, request.stop)
        if end > seq.emitted:
            seq.on_event(Delta(seq.text[seq.emitted : end]))
            seq.emitted = end

    def _retire(self) -> None:
        """Removes finished and cancelled requests, compacting running rows to 0..n-1."""
        for row in reversed(range(len(self._running))):
            seq = self._running[row]
            if seq.finish_reason is None and not seq.cancelled:
                continue
            last = len(self._running) - 1
            if row != last:
                moved = self._running[last]
                self.runner.move(last, row, moved.position)
                self._running[row] = moved
            self._running.pop()
            self._finish(seq, seq.finish_reason or "cancelled")

    def _finish(self, seq: _Sequence, reason: str) -> None:
        self._by_id.pop(seq.request_id, None)
        now = time.perf_counter()
        n = len(seq.token_ids)
        first = seq.first_token_at or now
        completion = Completion(
            text=seq.text,
            token_ids=list(seq.token_ids),
            finish_reason=reason,
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=n,
            time_to_first_token_s=first - seq.submitted,
            latency_s=now - seq.submitted,
            tokens_per_s=(n - 1) / (now - first) if n > 1 and now > first else 0.0,
        )
        seq.on_event(Delta(seq.text[seq.emitted :], completion))
        seq.emitted = len(seq.text)


def release_openmp_workers() -> bool:
    """Frees the calling thread's idle OpenMP worker threads (libgomp's `omp_pause_resource_all`).

    libgomp spins only ~100 iterations instead of ~300,000 before sleeping whenever it manages
    more threads than there are CPUs, and every thread that ever ran a multi-threaded torch op
    keeps a team of workers. A model loaded or evaluated on the main thread therefore made each
    parallel region of the engine's decode thread wake sleeping workers: a 2-thread int4 decode
    step took 1.5x as long as on the main thread (bench/engine_threads.py). Freeing the loading
    thread's team (it is rebuilt if that thread runs parallel ops again) leaves the decode
    thread's team the only one.

    Every libgomp loaded in the process is asked (wheels such as faiss bundle their own copy,
    each with its own teams).

    Returns:
        Whether a libgomp was found and released this thread's resources (False elsewhere, e.g.
        on macOS: a no-op).
    """
    try:
        with open("/proc/self/maps") as maps:  # libraries loaded now (some load late, e.g. with faiss)
            paths = sorted({line.split()[-1] for line in maps if "libgomp" in line.rsplit("/", 1)[-1]})
    except OSError:
        return False
    released = False
    for path in paths:
        if path not in _libgomps:
            try:
                _libgomps[path] = ctypes.CDLL(path)
            except OSError:
                _libgomps[path] = None
        lib = _libgomps[path]
        if lib is not None and hasattr(lib, "omp_pause_resource_all"):
            released |= lib.omp_pause_resource_all(1) == 0  # omp_pause_soft
    return released


_libgomps: dict[str, Any] = {}  # path -> loaded handle (None: could not be opened)


def _set_threads(n: int) -> None:
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
