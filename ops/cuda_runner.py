"""The engine's Llama-family forward on a CUDA device: static decode step, CUDA graphs, FlashAttention.

`CudaLlamaRunner` is the `ops.runner.LlamaRunner` the engine uses when the model is on a CUDA device:

- decode has fixed shapes: every step attends over the whole static KV cache with per-row lengths
  (flash-attn's `flash_attn_with_kvcache`, else SDPA with a length mask; `ops.attention`), and the
  running rows are padded up to a batch bucket (1, 2, 4, 8, ...), so one CUDA graph per bucket,
  captured at warm-up, replays a whole step with one launch;
- the hot path calls the compiled ops directly: `fused_add_rms_norm_` for every residual add and
  the norm after it, `silu_and_mul` on the fused gate/up projection (`ops.kernels`; the pure
  PyTorch references where the native CUDA build is missing);
- prefill runs SDPA with the flash kernel forced where its constraints hold.

Nothing here needs a GPU to run: on a CPU model (tests) the same step runs eagerly with SDPA.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ops import kernels as K
from ops.attention import AttentionChoice, choose_decode_attention, prefill_sdpa_backends
from ops.runner import LlamaRunner
from ops.quantization import fuse_weight_only

log = logging.getLogger(__name__)

# Cache length is rounded up to this, so the SDPA length mask meets the memory-efficient kernel's
# alignment (its last dimension a multiple of 16) without padding copies.
_CACHE_ALIGN = 64


def batch_buckets(max_batch_size: int) -> list[int]:
    """Batch sizes that get a CUDA graph: powers of two below `max_batch_size`, and it.

    A step with B running rows replays the graph of the smallest bucket >= B; the extra rows are
    free cache rows fed token 0 at position 0, which a later prefill overwrites.
    """
    buckets, b = [], 1
    while b < max_batch_size:
        buckets.append(b)
        b *= 2
    return buckets + [max_batch_size]


def _norm_weight(norm: nn.Module) -> tuple[torch.Tensor, float] | None:
    """(weight, eps) of an HF RMSNorm (Llama, Mistral, Qwen2/3), else None."""
    weight, eps = getattr(norm, "weight", None), getattr(norm, "variance_epsilon", None)
    if type(norm).__name__.endswith("RMSNorm") and isinstance(weight, torch.Tensor) and isinstance(eps, float):
        return weight, eps
    return None


def _fuse_sharing_storage(linears: list[nn.Module]) -> nn.Linear | None:
    """One `nn.Linear` computing all of `linears` (outputs concatenated), which keep working.

    The originals' weights (and biases) become row views of the fused ones, so fusing costs no
    memory and the model's own modules still compute what they did.

    Returns:
        The fused layer, or None unless all are plain `nn.Linear` with one input size and bias presence.
    """
    first = linears[0]
    if any(type(m) is not nn.Linear or m.in_features != first.in_features
           or (m.bias is None) != (first.bias is None) for m in linears):
        return None
    weight = torch.cat([m.weight.detach() for m in linears])  # (sum N, K)
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=first.bias is not None, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if first.bias is not None:
        fused.bias = nn.Parameter(torch.cat([m.bias.detach() for m in linears]), requires_grad=False)
    offset = 0
    for m in linears:
        rows = slice(offset, offset + m.out_features)
        m.weight.data = fused.weight.data[rows]
        if m.bias is not None:
            m.bias.data = fused.bias.data[rows]
        offset += m.out_features
    return fused


class CudaLlamaRunner(LlamaRunner):
    """`LlamaRunner` with a static-shape decode step captured in CUDA graphs (see the module docstring).

    Args:
        model: a Llama-family HF causal LM (on CUDA for graphs and FlashAttention).
        max_batch_size: rows of the KV cache.
        max_seq_len: positions per row (the cache is rounded up to a multiple of 64).
        fuse_qkv: fuse q/k/v and gate/up projections into one matmul each.
        cuda_graphs: capture the decode step per batch bucket at warm-up (CUDA devices only).
    """

    # A prompt is prefilled whole: the padding rows of a bucketed decode step write position 0 of
    # the free rows, which would overwrite the first key/value of a row prefilled in chunks.
    chunked_prefill = False

    def __init__(self, model: nn.Module, max_batch_size: int, max_seq_len: int, fuse_qkv: bool,
                 cuda_graphs: bool = True):
        cache_len = -(-max_seq_len // _CACHE_ALIGN) * _CACHE_ALIGN
        super().__init__(model, max_batch_size, cache_len, fuse_qkv, compile=False)
        device, dtype = self.k_cache[0].device, self.k_cache[0].dtype
        self.attention = choose_decode_attention(device, dtype, self.head_dim)
        self._flash_kvcache: Callable[..., torch.Tensor] | None = None
        if self.attention.name == "flash_attn_with_kvcache":
            try:
                from flash_attn import flash_attn_with_kvcache
            except ImportError as exc:  # installed but broken (e.g. built for another torch)
                self.attention = AttentionChoice("sdpa_efficient", f"flash-attn does not import ({exc}); decode "
                                                 "runs SDPA's memory-efficient kernel with a length mask")
                log.warning("decode attention: %s", self.attention.reason)
            else:
                self._flash_kvcache = flash_attn_with_kvcache
        self._prefill_backends = prefill_sdpa_backends(device, dtype, self.head_dim)
        self._decode_backends = [SDPBackend.EFFICIENT_ATTENTION] if self.attention.name == "sdpa_efficient" else [
            SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        layers = self.layers
        # Residual adds fused with the norm after them: post_attention_layernorm of a layer, then the
        # next layer's input_layernorm (the final norm after the last layer).
        after_mlp = [layer.input_layernorm for layer in layers[1:]] + [self.norm]
        self._add_norms = [(_norm_weight(layer.post_attention_layernorm), _norm_weight(nxt))
                           for layer, nxt in zip(layers, after_mlp)]
        self.buckets = batch_buckets(max_batch_size)
        self._tokens = torch.zeros(max_batch_size, dtype=torch.long, device=device)
        self._positions = torch.zeros(max_batch_size, dtype=torch.long, device=device)
        self._cache_index = torch.arange(cache_len, device=device)  # (T_max,)
        self._rows = torch.arange(max_batch_size, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.compiled = bool(cuda_graphs) and device.type == "cuda"

    # ------------------------------------------------------------------ fused projections

    @staticmethod
    def _fused_qkv(attn: nn.Module) -> nn.Module | None:
        projs = [attn.q_proj, attn.k_proj, attn.v_proj]
        return _fuse_sharing_storage(projs) or fuse_weight_only(projs)

    @staticmethod
    def _fused_gate_up(mlp: nn.Module) -> nn.Module | None:
        """gate/up as one matmul for a SwiGLU MLP, unpatched or patched by `ops.patch` (same math)."""
        act = getattr(mlp, "act_fn", None)
        is_silu = isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"
        has_projs = all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))
        if not is_silu or not has_projs or ("forward" in vars(mlp) and not _patched_swiglu(mlp)):
            return None
        projs = [mlp.gate_proj, mlp.up_proj]
        return _fuse_sharing_storage(projs) or fuse_weight_only(projs)

    def _mlp(self, i: int, x: torch.Tensor, slots: torch.Tensor | None = None) -> torch.Tensor:
        # No LoRA slots on CUDA (the engine refuses max_adapters there), so `slots` is always None.
        if self.gate_up[i] is None:
            return self.layers[i].mlp(x)
        return self.layers[i].mlp.down_proj(K.silu_and_mul(self.gate_up[i](x)))

    # ------------------------------------------------------------------ prefill

    @torch.inference_mode()
    def prefill(self, row: int, input_ids: torch.Tensor) -> torch.Tensor:
        """Runs a prompt into cache row `row` with the prefill SDPA kernels; returns (V,) last logits."""
        with sdpa_kernel(self._prefill_backends):
            return super().prefill(row, input_ids)

    # ------------------------------------------------------------------ decode

    def _add_norm(self, x: torch.Tensor, residual: torch.Tensor, norm: tuple[torch.Tensor, float] | None,
                  module: nn.Module) -> torch.Tensor:
        """`residual += x`, then the norm of the sum (one compiled op when `norm` is an RMSNorm's)."""
        if norm is None:
            residual.add_(x)
            return module(residual)
        K.fused_add_rms_norm_(x, residual, norm[0], norm[1])
        return x

    def _attend(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                seqlens: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        """Writes this step's key/value at each row's position and attends over the row's cache.

        Args:
            q: (B, nh, 1, hs) rotated queries.
            k, v: (B, n_kv, 1, hs) this step's keys (rotated) and values.
            positions: (B,) cache index of this step's token per row.
            seqlens: (B,) int32 positions (flash-attn path), else None.
            mask: (B, 1, 1, T_max) additive length mask (SDPA path), else None.

        Returns:
            (B, 1, nh * hs) attention output.
        """
        B = q.shape[0]
        scale = self.layers[i].self_attn.scaling
        k_cache, v_cache = self.k_cache[i][:B], self.v_cache[i][:B]  # (B, n_kv, T_max, hs)
        if self._flash_kvcache is not None:
            # flash-attn wants (B, T, heads, hs); the transposed views keep hs contiguous, which is all it needs
            y = self._flash_kvcache(q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                                    k=k.transpose(1, 2), v=v.transpose(1, 2), cache_seqlens=seqlens,
                                    softmax_scale=scale)  # (B, 1, nh, hs)
            return y.reshape(B, 1, -1)
        rows = self._rows[:B]
        k_cache[rows, :, positions] = k[:, :, 0]
        v_cache[rows, :, positions] = v[:, :, 0]
        # GQA without repeat_kv: the n_rep query heads of a kv head act as its query length
        q = q.reshape(B, self.n_kv_head, self.n_head // self.n_kv_head, self.head_dim)  # (B, n_kv, n_rep, hs)
        with sdpa_kernel(self._decode_backends):
            y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, scale=scale)
        return y.reshape(B, 1, -1)

    def _static_step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One decode step with shapes fixed by the batch size alone (what a CUDA graph records).

        Args:
            tokens: (B,) last token per row.
            positions: (B,) its cache index.

        Returns:
            (B, V) float32 next-token logits.
        """
        residual = self.embed_tokens(tokens[:, None])  # (B, 1, C), this step's own tensor
        rope = self._rope(residual, positions[:, None])
        seqlens = mask = None
        if self._flash_kvcache is not None:
            seqlens = positions.to(torch.int32)
        else:
            visible = self._cache_index[None, :] <= positions[:, None]  # (B, T_max)
            mask = torch.zeros(visible.shape, dtype=self.k_cache[0].dtype, device=tokens.device)
            mask = mask.masked_fill_(~visible, float("-inf"))[:, None, None, :]  # (B, 1, 1, T_max)
        h = self.layers[0].input_layernorm(residual)
        for i, layer in enumerate(self.layers):
            q, k, v = self._heads(i, h, rope)
            attn = layer.self_attn.o_proj(self._attend(i, q, k, v, positions, seqlens, mask))
            post_attention, after_mlp = self._add_norms[i]
            h = self._add_norm(attn, residual, post_attention, layer.post_attention_layernorm)
            nxt = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.norm
            h = self._add_norm(self._mlp(i, h), residual, after_mlp, nxt)
        return self.lm_head(h)[:, 0].float()

    def _bucket(self, batch: int) -> int:
        return next(b for b in self.buckets if b >= batch)

    @torch.inference_mode()
    def decode_one_token(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feeds one token per running request (rows 0..B-1) through the captured graph of its bucket.

        Args:
            tokens: (B,) last token of each request.
            positions: (B,) position of that token (= its KV cache index).

        Returns:
            (B, V) next-token logits (a view of the graph's output: read before the next step).
        """
        B = tokens.shape[0]
        bucket = self._bucket(B)
        self._tokens[:B].copy_(tokens)
        self._positions[:B].copy_(positions)
        if bucket > B:
            self._tokens[B:bucket].zero_()
            self._positions[B:bucket].zero_()
        captured = self._graphs.get(bucket) if self.compiled else None
        if captured is None:
            return self._static_step(self._tokens[:bucket], self._positions[:bucket])[:B]
        graph, logits = captured
        graph.replay()
        return logits[:B]

    @torch.inference_mode()
    def warmup(self, set_threads: Callable[[int], None] = lambda batch: None) -> None:
        """Checks the decode attention kernel, then captures one CUDA graph per batch bucket.

        Runs before the engine serves: the warm-up steps write cache position 0 of free rows only.
        """
        self._check_decode_kernel()
        if not self.compiled:
            return
        started = time.perf_counter()
        device = self._tokens.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # lazy initialisation (cuBLAS handles, workspaces) outside capture
            for b in reversed(self.buckets):
                self._static_step(self._tokens[:b], self._positions[:b])
        torch.cuda.current_stream(device).wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.buckets):  # largest first: the smaller graphs reuse its memory
            graph = torch.cuda.CUDAGraph()
            # thread_local: another engine's thread may launch work while this one captures
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                logits = self._static_step(self._tokens[:b], self._positions[:b])
            self._graphs[b] = (graph, logits)
        torch.cuda.synchronize(device)
        log.info("captured %d decode CUDA graphs (batch %s) in %.1f s", len(self._graphs), self.buckets,
                 time.perf_counter() - started)

    def _check_decode_kernel(self) -> None:
        """Makes sure the forced memory-efficient SDPA kernel takes the decode inputs; else lets torch choose."""
        if self.attention.name != "sdpa_efficient":
            return
        try:
            self._static_step(self._tokens[:1], self._positions[:1])
        except RuntimeError as exc:
            self._decode_backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            self.attention = AttentionChoice("sdpa", f"SDPA's memory-efficient kernel refused the decode inputs "
                                             f"({first}); torch picks the kernel")
            log.warning("decode attention: %s", self.attention.reason)


def _patched_swiglu(mlp: nn.Module) -> bool:
    """Whether `mlp.forward` is the compiled-op SwiGLU of `ops.patch` (same math as the unpatched one)."""
    from ops.patch import _mlp_forward

    forward = vars(mlp).get("forward")
    return getattr(forward, "__func__", None) is _mlp_forward
