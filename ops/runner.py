"""Model runners of the engine: weights, KV cache, prefill and one decode step (gpt-fast's model.py).

`LlamaRunner` is a gpt-fast style forward over the HF submodules of a Llama-family model with a
preallocated KV cache, so that swapped-in linear layers, patched norms/MLPs and PEFT LoRA layers
all still apply; `HFRunner` is the plain HF forward with one `DynamicCache` per request, for any
other architecture. The scheduler (ops/engine.py) owns which request sits in which cache row.
"""

from __future__ import annotations

import copy
import inspect
import logging
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ops.attention import AttentionChoice
from ops.multi_lora import MultiLora
from ops.quantization import fuse_weight_only

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")

log = logging.getLogger(__name__)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rms_norm_args(norm: nn.Module) -> tuple[torch.Tensor, float] | None:
    """(weight, eps) of a float32 HF RMSNorm, unpatched or on the compiled op (same arithmetic); else None."""
    weight, eps = getattr(norm, "weight", None), getattr(norm, "variance_epsilon", None)
    if (not type(norm).__name__.endswith("RMSNorm") or not isinstance(eps, float)
            or not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.dtype != torch.float32):
        return None
    forward = vars(norm).get("forward")
    if forward is not None:
        from ops.patch import _rms_norm_forward

        if getattr(forward, "__func__", None) is not _rms_norm_forward:
            return None
    return weight, eps


def _fast_norm(norm: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """`F.rms_norm` (one op instead of HF's eight) for an unpatched float32 HF RMSNorm, else the module."""
    args = _rms_norm_args(norm)
    if args is None or "forward" in vars(norm):  # patched: the compiled op runs
        return norm
    weight, eps = args
    shape = (weight.shape[0],)
    return lambda x: F.rms_norm(x, shape, weight, eps) if x.dtype == torch.float32 else norm(x)


def _is_swiglu(mlp: nn.Module) -> bool:
    """An HF SwiGLU MLP (`down(silu(gate(x)) * up(x))`), unpatched or on the compiled `silu_mul`."""
    act = getattr(mlp, "act_fn", None)
    if not (isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"):
        return False
    if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return False
    forward = vars(mlp).get("forward")
    if forward is None:
        return True
    from ops.patch import _mlp_forward

    return getattr(forward, "__func__", None) is _mlp_forward


def _decode_linear(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """`module` for the (B, K) rows of a decode step: an int4 CPU layer as one `raylm::int4_bf16_linear`
    call where it applies, else one `raylm::int4_linear` (its forward's reshapes and casts are separate
    dispatches), anything else as it is."""
    from ops.quantization import Int4WeightOnlyLinear, int4_dot_operands

    dot = int4_dot_operands(module)
    if dot is not None:
        return lambda x: torch.ops.raylm.int4_bf16_linear(x, *dot)
    if type(module) is not Int4WeightOnlyLinear or module.bias is not None or module.packed.is_cuda:
        return module
    op = torch.ops.raylm.int4_linear
    return lambda x: op(x, module.packed, module.group_size, module.scales_and_zeros)


class LlamaRunner:
    """gpt-fast style forward of a Llama-family HF model with a static KV cache.

    The cache has one row per running request; rows 0..n-1 are the running ones (the
    scheduler compacts them with `move`), so decode works on contiguous views.
    """

    def __init__(self, model: nn.Module, max_batch_size: int, max_seq_len: int, fuse_qkv: bool,
                 compile: bool = False, lora: MultiLora | None = None):
        self.model = model
        self.lora = lora  # unmerged adapters per row; None: no LoRA slots (the fastest base-only graph)
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
        self.compiled = False  # True once decode steps run the compiled graphs (after `warmup`)
        # eager decode on the raylm ops (`_decode_native`) where they serve this model: decided at the
        # first step (it loads the native library); None = the torch ops of `_decode`
        self._native_plan: list[tuple] | None = None
        self._native_checked = False
        self._native_layers: Any = None  # raylm.DecodeLayers when the whole plan runs in C++
        self._step: Callable[..., torch.Tensor] = self._decode
        self._compiled_layer: Callable[..., torch.Tensor] | None = None
        self._pending_step: Callable[..., torch.Tensor] | None = None  # compiled off-thread, swapped in by a step
        self._layer_views: list[LlamaRunner] = []
        if compile:
            # Regional compilation: one graph of one decoder layer, run for every layer. The layers
            # differ only in their tensors, so the graph built for the first serves all the others
            # (Dynamo guards their types and shapes): the build is one layer's, not the model's, which
            # with adapter slots (a LoRA gather per projection) is what makes compiling affordable.
            # dynamic: the attended length T (and the batch size above 1) are symbols, not one graph
            # each. The unbound function: a scratch runner (its own small KV cache, the same weights)
            # can build the graphs that this runner then runs, since Dynamo keeps them on the code object.
            options = {"cpp_wrapper": True} if param.device.type == "cpu" else {}
            self._compiled_layer = torch.compile(LlamaRunner._layer_decode, dynamic=True, fullgraph=True,
                                                 options=options)
            self._layer_views = [self._layer_view(i) for i in range(len(self.layers))]

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
        if not _is_swiglu(mlp):
            return None
        return fuse_weight_only([mlp.gate_proj, mlp.up_proj])

    def _mlp(self, i: int, x: torch.Tensor, slots: torch.Tensor | None = None) -> torch.Tensor:
        mlp = self.layers[i].mlp
        lora = self.lora if slots is not None else None
        if lora is None and self.gate_up[i] is None:
            return mlp(x)
        if self.gate_up[i] is not None:
            gate_up = self.gate_up[i](x)
        else:
            gate_up = torch.cat([mlp.gate_proj(x), mlp.up_proj(x)], dim=-1)
        if lora is not None and "gate_up" in lora.groups:
            gate_up = gate_up + lora.delta("gate_up", i, x, slots)
        gate, up = gate_up.chunk(2, dim=-1)
        h = F.silu(gate) * up
        y = mlp.down_proj(h)
        return y + lora.delta("down", i, h, slots) if lora is not None and "down" in lora.groups else y

    def _o_proj(self, i: int, y: torch.Tensor, slots: torch.Tensor | None) -> torch.Tensor:
        out = self.layers[i].self_attn.o_proj(y)
        if slots is not None and self.lora is not None and "o" in self.lora.groups:
            out = out + self.lora.delta("o", i, y, slots)
        return out

    def _qkv(self, i: int, x: torch.Tensor, slots: torch.Tensor | None) -> torch.Tensor:
        """(B, T, C) -> (B, T, (nh + 2 n_kv) hs): q, k and v projections concatenated, LoRA applied."""
        attn = self.layers[i].self_attn
        if self.qkv[i] is not None:
            qkv = self.qkv[i](x)
        else:
            qkv = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1)
        if slots is not None and self.lora is not None and "qkv" in self.lora.groups:
            qkv = qkv + self.lora.delta("qkv", i, x, slots)
        return qkv

    def _heads(
        self, i: int, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], slots: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projects q/k/v and rotates q/k.

        Args:
            x: (B, T, C) normalized hidden states.
            rope: cos and sin, each (B, 1, T, hs).
            slots: (B,) LoRA slot of each row (0: none), or None without LoRA slots.

        Returns:
            q (B, nh, T, hs), k and v (B, n_kv, T, hs).
        """
        attn = self.layers[i].self_attn
        B, T, _ = x.shape
        cos, sin = rope
        qkv = self._qkv(i, x, slots)
        if not hasattr(attn, "q_norm"):
            # rotate q and k heads together: one set of RoPE ops instead of two
            qkv = qkv.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh + 2 n_kv, T, hs)
            qk, v = qkv.split([self.n_head + self.n_kv_head, self.n_kv_head], dim=1)
            qk = qk * cos + _rotate_half(qk) * sin
            q, k = qk.split([self.n_head, self.n_kv_head], dim=1)
            return q, k, v
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = qkv.split([q_dim, kv_dim, kv_dim], dim=-1)
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

    chunked_prefill = True  # `prefill` continues a row from any `start` (chunks, reused prefixes)

    @torch.inference_mode()
    def prefill(self, row: int, input_ids: torch.Tensor, slot: int = 0, start: int = 0) -> torch.Tensor:
        """Runs prompt tokens into cache row `row` at positions start..start+T-1.

        Args:
            row: KV cache row of the request.
            input_ids: (T,) prompt token ids.
            slot: LoRA slot of the request (0: no adapter).
            start: cache positions 0..start-1 of the row already hold this prompt's earlier tokens
                (an earlier chunk, or a reused prefix); the new tokens attend to them.

        Returns:
            (V,) logits of the last position.
        """
        T = input_ids.shape[0]
        x = self.embed_tokens(input_ids[None])  # (1, T, C)
        positions = torch.arange(start, start + T, device=x.device)
        rope = self._rope(x, positions[None])
        slots = slot if self.lora is not None and slot else None  # one row: its adapter's weights as they are
        for i, layer in enumerate(self.layers):
            q, k, v = self._heads(i, layer.input_layernorm(x), rope, slots)
            x = x + self._o_proj(i, self._attention(i, q, k, v, positions, start + T, None, row=row), slots)
            x = x + self._mlp(i, layer.post_attention_layernorm(x), slots)
        x = self.norm(x[:, -1:])
        return self.lm_head(x)[0, -1].float()

    @torch.inference_mode()
    def decode_one_token(
        self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Feeds one token per running request (rows 0..B-1).

        Args:
            tokens: (B,) last token of each request.
            positions: (B,) position of that token (= its KV cache index).
            slots: (B,) LoRA slot of each row (0: none); None is all zeros. With LoRA slots every
                step gets a slots tensor of the same shape, so one graph serves any adapter mix.

        Returns:
            (B, V) next-token logits.
        """
        if self._pending_step is not None:  # compiled in the background: from this step on
            self._step, self.compiled, self._pending_step = self._pending_step, True, None
        T = int(positions.max()) + 1  # attend only over the filled part of the cache
        # every row at the last position (always at batch 1): no mask. Compiled, several rows always
        # take the masked path, so that two graphs (1 row / several) cover every step.
        uniform = tokens.shape[0] == 1 or (not self.compiled and int(positions.min()) + 1 == T)
        if self.lora is not None and not self.compiled and (slots is None or not bool(slots.any())):
            slots = None  # eager, base rows only: every delta would be zero, at ~30 small ops per layer
        elif self.lora is not None and not self.compiled and bool((slots == slots[0]).all()):
            # eager, every row on one adapter (always at batch 1): plain matmuls on that slot's
            # weights, without gathering a copy per row (MultiLora.delta with an int slot)
            return self._step(tokens, positions, T, uniform, int(slots[0]))
        elif self.lora is not None:
            # Made here, inside inference mode, whether given or not: a tensor made outside it carries
            # one more dispatch key, which the compiled graph's guards see as a new input (recompile).
            slots = torch.zeros_like(tokens) if slots is None else slots.clone()
        return self._step(tokens, positions, T, uniform, slots if self.lora is not None else None)

    @property
    def compiles(self) -> bool:
        """Whether this runner was made with `compile` (its graphs are built by `warmup`)."""
        return self._compiled_layer is not None

    def warmup(self, set_threads: Callable[[int], None] = lambda batch: None, background: bool = False) -> None:
        """Compiles the decode graphs now (the first step of each would otherwise take that long).

        Args:
            set_threads: Called with the batch size before each graph, so that it is compiled
                under the intra-op threads it will run with.
            background: Build the graphs on a scratch runner (the same weights and adapter slots, a
                KV cache of a few positions) instead of this one, so that this can run on another
                thread while this runner decodes eagerly: its cache rows belong to running requests.
                The next `decode_one_token` then switches to the compiled graphs. The graphs are
                shape-generic (`dynamic=True`), so the scratch cache's sizes do not recompile them.

        In place, writes only cache positions 1..2 of rows 0..1, which a request's prefill overwrites.
        """
        if self._compiled_layer is None or self.compiled:
            return
        runner = self._scratch() if background else self
        device = self.k_cache[0].device
        max_batch, max_len = runner.k_cache[0].shape[0], runner.k_cache[0].shape[2]
        runner._step, runner.compiled = runner._decode_by_layer, True
        # No duck sizing: a scratch size that happens to equal another dimension (the head size,
        # the kv heads) would be tied to it, or specialized with it, and the real cache recompile.
        from torch.fx.experimental import _config as fx_config

        try:
            for B in (1, 2) if max_batch > 1 and max_len > 2 else (1,):
                set_threads(B)
                started = time.perf_counter()
                positions = torch.arange(1, B + 1, device=device)
                with fx_config.patch(use_duck_shape=False):
                    runner.decode_one_token(torch.zeros(B, dtype=torch.long, device=device), positions)
                log.info("compiled the decode step for %s in %.1f s", "1 request" if B == 1 else "batches",
                         time.perf_counter() - started)
        except BaseException:
            self._step, self.compiled = self._decode, False
            raise
        step = self._decode_by_layer
        if background:
            self._pending_step = step
        else:
            self._step = step

    def _scratch(self) -> LlamaRunner:
        """This runner with a KV cache of its own, a few positions long (for compiling off-thread)."""
        scratch = copy.copy(self)
        B, n_kv, T, hs = self.k_cache[0].shape
        shape = (min(B, 4), n_kv, min(T, 16), hs)
        scratch.k_cache = [torch.zeros(shape, dtype=k.dtype, device=k.device) for k in self.k_cache]
        scratch.v_cache = [torch.zeros(shape, dtype=v.dtype, device=v.device) for v in self.v_cache]
        scratch._pending_step = None
        # the native plan holds this runner's caches: the scratch builds its own if it decodes natively
        scratch._native_plan, scratch._native_checked, scratch._native_layers = None, False, None
        scratch._layer_views = [scratch._layer_view(i) for i in range(len(self.layers))]
        return scratch

    def _layer_view(self, i: int) -> LlamaRunner:
        """This runner seen as a one-layer model holding layer `i` (its modules, KV cache, adapter slots)
        at index 0: the argument of the compiled layer graph, alike for every layer."""
        view = copy.copy(self)
        layer = self.layers[i]
        view.layers, view.k_cache, view.v_cache = [layer], [self.k_cache[i]], [self.v_cache[i]]
        view.qkv, view.gate_up = [self.qkv[i]], [self.gate_up[i]]
        # the norm modules, not `_fast_norm`'s per-layer closures: inside the graph the norm fuses
        # either way, and a closure is guarded by identity (one graph per layer)
        view.norms = [(layer.input_layernorm, layer.post_attention_layernorm)]
        view.lora = self.lora.layer_view(i) if self.lora is not None else None
        view._layer_views = []
        return view

    @staticmethod
    def _layer_decode(view: LlamaRunner, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      positions: torch.Tensor, T: int, mask: torch.Tensor | None,
                      slots: torch.Tensor | None) -> torch.Tensor:
        """One decoder layer of a decode step, on a `_layer_view` (the compiled region)."""
        input_norm, post_attention_norm = view.norms[0]
        q, k, v = view._heads(0, input_norm(x), (cos, sin), slots)
        x = x + view._o_proj(0, view._attention(0, q, k, v, positions, T, mask), slots)
        return x + view._mlp(0, post_attention_norm(x), slots)

    def _decode_by_layer(self, tokens: torch.Tensor, positions: torch.Tensor, T: int, uniform: bool,
                         slots: torch.Tensor | None = None) -> torch.Tensor:
        """`_decode` with every layer through the compiled layer graph."""
        assert self._compiled_layer is not None
        mask = self._decode_mask(tokens, positions, T, uniform)
        x = self.embed_tokens(tokens[:, None])  # (B, 1, C)
        cos, sin = self._rope(x, positions[:, None])
        for view in self._layer_views:
            x = self._compiled_layer(view, x, cos, sin, positions, T, mask, slots)
        return self.lm_head(self.final_norm(x))[:, 0].float()

    def _decode_mask(self, tokens: torch.Tensor, positions: torch.Tensor, T: int, uniform: bool) -> torch.Tensor | None:
        if uniform:
            return None
        # (B, 1, 1, T): row b sees cache positions 0..positions[b]; additive, built once per step
        visible = (torch.arange(T, device=tokens.device)[None, :] <= positions[:, None])[:, None, None, :]
        mask = torch.zeros(visible.shape, dtype=self.k_cache[0].dtype, device=tokens.device)
        return mask.masked_fill_(~visible, float("-inf"))

    def _decode(self, tokens: torch.Tensor, positions: torch.Tensor, T: int, uniform: bool,
                slots: torch.Tensor | int | None = None) -> torch.Tensor:
        if not self._native_checked:
            self._native_plan, self._native_checked = self._build_native_plan(), True
        if self._native_plan is not None:
            return self._decode_native(tokens, positions, slots)
        mask = self._decode_mask(tokens, positions, T, uniform)
        x = self.embed_tokens(tokens[:, None])  # (B, 1, C)
        rope = self._rope(x, positions[:, None])
        for i, layer in enumerate(self.layers):
            input_norm, post_attention_norm = self.norms[i]
            q, k, v = self._heads(i, input_norm(x), rope, slots)
            x = x + self._o_proj(i, self._attention(i, q, k, v, positions, T, mask), slots)
            x = x + self._mlp(i, post_attention_norm(x), slots)
        return self.lm_head(self.final_norm(x))[:, 0].float()

    def _build_native_plan(self) -> list[tuple] | None:
        """Per layer, the modules and norm arguments `_decode_native` runs; None where the raylm ops do
        not serve this model (not float32 on CPU, a layer unlike Llama's, no native library)."""
        if self.k_cache[0].device.type != "cpu" or self.k_cache[0].dtype != torch.float32:
            return None
        norms = [_rms_norm_args(m) for layer in self.layers
                 for m in (layer.input_layernorm, layer.post_attention_layernorm)] + [_rms_norm_args(self.norm)]
        if any(n is None for n in norms):
            return None
        for layer in self.layers:
            attn = layer.self_attn
            if hasattr(attn, "q_norm") or not isinstance(getattr(attn, "scaling", None), float) \
                    or not _is_swiglu(layer.mlp):
                return None
        if any(qkv is None for qkv in self.qkv):
            return None
        from ops.native_build import backend

        if "cpu" not in backend().devices:
            return None
        self._first_norm = norms[0]
        plan = []
        for i, layer in enumerate(self.layers):
            mlp = layer.mlp
            gate_up = self.gate_up[i]
            # the post-attention norm, then the next layer's input norm (the final norm after the last)
            plan.append((_decode_linear(self.qkv[i]), _decode_linear(layer.self_attn.o_proj),
                         None if gate_up is None else _decode_linear(gate_up), _decode_linear(mlp.gate_proj),
                         _decode_linear(mlp.up_proj), _decode_linear(mlp.down_proj),
                         norms[2 * i + 1], norms[2 * i + 2], layer.self_attn.scaling))
        self._native_layers = self._build_native_layers(plan)
        return plan

    def _build_native_layers(self, plan: list[tuple]) -> Any:
        """`plan` as one `raylm.DecodeLayers` (the layer loop in C++), or None where a projection is
        neither a float `nn.Linear` nor an int4 CPU layer, or gate/up are not one matmul (the Python
        loop of `_decode_native` then runs them). Int4 layers run on `int4_bf16_linear` where
        `int4_dot_operands` allows (their repacked weights are built here, held by the plan)."""
        from ops.quantization import Int4WeightOnlyLinear, int4_dot_operands

        def spec(module: nn.Module) -> tuple[int, torch.Tensor, torch.Tensor, int] | None:
            dot = int4_dot_operands(module)
            if dot is not None:  # our AVX512-BF16 kernel (docs/benchmarks/ops.md)
                return 2, *dot, 0
            if type(module) is nn.Linear:
                bias = module.bias if module.bias is not None else module.weight.new_empty(0)
                return 0, module.weight, bias, 0
            if type(module) is Int4WeightOnlyLinear and module.bias is None and not module.packed.is_cuda:
                return 1, module.packed, module.scales_and_zeros, module.group_size
            return None

        layers = torch.classes.raylm.DecodeLayers(self.n_head)
        for i, (layer, (*_, post_norm, next_norm, scale)) in enumerate(zip(self.layers, plan)):
            specs = [spec(m) for m in (self.qkv[i], layer.self_attn.o_proj, self.gate_up[i], layer.mlp.down_proj)]
            if any(s is None for s in specs):
                return None
            layers.add_layer(self.k_cache[i], self.v_cache[i], [s[0] for s in specs],
                             [t for s in specs for t in s[1:3]], [s[3] for s in specs],
                             *post_norm, *next_norm, scale)
            for j, group in enumerate(("qkv", "o", "gate_up", "down")):
                if self.lora is not None and group in self.lora.groups:
                    layers.set_lora(i, j, *self.lora.bgmv_operands(group, i))
        return layers

    def _decode_native(self, tokens: torch.Tensor, positions: torch.Tensor,
                       slots: torch.Tensor | int | None) -> torch.Tensor:
        """`_decode` on the raylm ops: per layer one fused-add norm after each sub-layer, one
        `decode_attention` (RoPE, cache write, attention at each row's own position) and
        `silu_and_mul`, with LoRA updates added in place; ~10 ops per layer instead of ~50, whose
        dispatch, not arithmetic, bounds a one-token step."""
        ops = torch.ops.raylm
        lora = self.lora if slots is not None else None
        groups = lora.groups if lora is not None else {}
        B = tokens.shape[0]
        x = self.embed_tokens(tokens)  # (B, C): the residual stream, updated in place
        cos, sin = self.rotary_emb(x, positions[:, None])  # (B, 1, hs)
        cos, sin = cos[:, 0], sin[:, 0]
        h = torch.empty_like(x)
        ops.rms_norm(h, x, *self._first_norm)
        if self._native_layers is not None:
            if isinstance(slots, int):
                slots = lora.uniform_slots(slots, B)
            h = self._native_layers.run(x, h, cos, sin, positions, slots, lora.scale if lora is not None else None,
                                        lora.max_rank if lora is not None else 0)
            return self.lm_head(h).float()
        for i, (qkv_proj, o_proj, gate_up, gate, up, down, post_norm, next_norm, scale) in enumerate(self._native_plan):
            qkv = qkv_proj(h)
            if "qkv" in groups:
                lora.add_delta_("qkv", i, h, slots, qkv)
            y = x.new_empty(B, self.n_head * self.head_dim)
            ops.decode_attention(y, qkv, cos, sin, self.k_cache[i], self.v_cache[i], positions, self.n_head, scale)
            h = o_proj(y)
            if "o" in groups:
                lora.add_delta_("o", i, y, slots, h)
            ops.fused_add_rms_norm(h, x, *post_norm)  # x += h; h = post_norm(x)
            if gate_up is not None:
                gu = gate_up(h)
            else:
                gu = torch.cat([gate(h), up(h)], dim=-1)
            if "gate_up" in groups:
                lora.add_delta_("gate_up", i, h, slots, gu)
            a = x.new_empty(B, gu.shape[-1] // 2)
            ops.silu_and_mul(a, gu)
            h = down(a)
            if "down" in groups:
                lora.add_delta_("down", i, a, slots, h)
            ops.fused_add_rms_norm(h, x, *next_norm)  # x += h; h = next norm(x)
        return self.lm_head(h).float()

    def _attention(
        self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, T: int,
        mask: torch.Tensor | None, row: int | None = None,
    ) -> torch.Tensor:
        """Writes k/v into layer `i`'s cache and attends q over cache positions 0..T-1.

        Args:
            q: (B, nh, S, hs) rotated queries; S = prompt tokens of a prefill (B = 1), 1 for a decode step.
            k, v: (B, n_kv, S, hs) new keys / values.
            positions: (S,) positions start..T-1 of a prefill's tokens; (B,) position of each row's
                token for a decode step (rows 0..B-1).
            T: attended cache length.
            mask: (B, 1, 1, T) additive mask of a decode step whose rows are at different
                positions; None when every row is at position T-1.
            row: cache row of a prefill (causal over the prompt); None for a decode step.

        Returns:
            (B, S, nh * hs) attention output, heads concatenated.
        """
        k_cache, v_cache = self.k_cache[i], self.v_cache[i]
        scale = self.layers[i].self_attn.scaling
        B, _, S, _ = q.shape
        n_rep = self.n_head // self.n_kv_head
        if row is not None:
            start = T - S
            k_cache[row, :, start:T] = k[0]
            v_cache[row, :, start:T] = v[0]
            causal = None
            if start:  # attend to the row's earlier positions too: position p sees 0..p
                k, v = k_cache[row : row + 1, :, :T], v_cache[row : row + 1, :, :T]
                causal = torch.arange(T, device=q.device)[None, :] <= positions[:, None]  # (S, T)
            # enable_gqa: each kv head serves its n_rep query heads in place. Copying the keys and
            # values per query head (repeat_interleave) reads and writes the whole row n_rep times,
            # which for a short chunk deep in a long prompt cost more than the attention itself.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, is_causal=causal is None, scale=scale,
                                               enable_gqa=n_rep > 1)
            return y.transpose(1, 2).reshape(1, S, -1)
        if mask is None:  # one position for all rows: no index_put
            k_cache[:B].index_copy_(2, positions[:1], k)
            v_cache[:B].index_copy_(2, positions[:1], v)
        else:
            rows = torch.arange(B, device=q.device)
            k_cache[rows, :, positions] = k[:, :, 0]
            v_cache[rows, :, positions] = v[:, :, 0]
        # GQA without repeat_kv: the n_rep query heads of a kv head act as its query length
        q = q.view(B, self.n_kv_head, n_rep, self.head_dim)  # (B, n_kv, n_rep, hs)
        y = F.scaled_dot_product_attention(q, k_cache[:B, :, :T], v_cache[:B, :, :T], attn_mask=mask, scale=scale)
        return y.reshape(B, 1, -1)

    def read_kv(self, row: int, start: int, end: int) -> torch.Tensor:
        """A copy of cache positions start..end-1 of `row`: (L, 2, n_kv, end - start, hs), keys then values."""
        return torch.stack([torch.stack([k[row, :, start:end], v[row, :, start:end]])
                            for k, v in zip(self.k_cache, self.v_cache)])

    def write_kv(self, row: int, start: int, kv: torch.Tensor) -> None:
        """Writes `kv` (L, 2, n_kv, T, hs), as `read_kv` returns it, into positions start..start+T-1 of `row`."""
        end = start + kv.shape[3]
        for layer, (k, v) in enumerate(zip(self.k_cache, self.v_cache)):
            k[row, :, start:end] = kv[layer, 0]
            v[row, :, start:end] = kv[layer, 1]

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

    chunked_prefill = True

    @torch.inference_mode()
    def prefill(self, row: int, input_ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Returns (V,) logits of the last position of `input_ids` (T,), fed after the row's first
        `start` tokens (an earlier chunk of the same prompt, already in the row's cache)."""
        cache = {self.cache_kwarg: self.caches[row]} if start else {}
        out = self.model(input_ids=input_ids[None], use_cache=True, **cache)
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


def is_llama_family(model: nn.Module, max_seq_len: int) -> bool:
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
