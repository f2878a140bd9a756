"""Unmerged LoRA adapters for many requests at once, over one (quantized) base (S-LoRA / Punica style).

Every resident adapter owns a slot of preallocated stacked tensors; a request carries its slot
index (0 = no adapter, an all-zero slot), and a decode step gathers each row's A and B:
``y = W x + s[slot] * B[slot] (A[slot] x)``. Ranks are zero-padded to ``max_rank`` and the number
of slots is fixed, so the tensor shapes never depend on which adapters are loaded or mixed in a
batch: a compiled decode graph serves every mix without recompiling.

Adapters are read from PEFT directories (``adapter_config.json`` + ``adapter_model.safetensors``)
without importing PEFT: only plain LoRA (no DoRA, no per-module rank/alpha patterns, no bias).
"""

from __future__ import annotations

import copy

import json
import math
import os
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# runner groups: projections computed from one input by one (possibly fused) base matmul
GROUPS: dict[str, tuple[str, ...]] = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",),
                                      "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}
PROJ_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
               "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
ADAPTER_WEIGHTS = "adapter_model.safetensors"


LORA_DTYPES = ("auto", "float32", "bfloat16")


def slot_dtype(model: nn.Module, requested: str = "auto") -> torch.dtype:
    """The dtype adapter slots store their weights in: ``requested`` ("float32" or "bfloat16"), or for
    "auto" bfloat16 when every targeted projection of the base computes in bfloat16 (weight-only
    int4/int8 layers round their activations to it), else float32. bfloat16 halves the bytes a decode
    step reads per adapter (as many as the int4 base's for four adapters in a batch) and is no coarser
    than such a base; a float32 base keeps PEFT's arithmetic."""
    if requested not in LORA_DTYPES:
        raise ValueError(f"lora_dtype={requested!r}; valid: {', '.join(LORA_DTYPES)}")
    if requested != "auto":
        return getattr(torch, requested)
    computes = {getattr(m, "compute_dtype", None) for name, m in model.named_modules()
                if name.rsplit(".", 1)[-1] in PROJ_PARENT}
    return torch.bfloat16 if computes == {"bfloat16"} else torch.float32


@dataclass(frozen=True)
class AdapterSpec:
    """What an adapter directory declares (``adapter_config.json``)."""

    path: Path
    rank: int
    scale: float
    targets: tuple[str, ...]
    file_bytes: int


def read_adapter_spec(path: str | os.PathLike) -> AdapterSpec:
    """Reads and checks a PEFT LoRA adapter's config.

    Raises:
        ValueError: not a PEFT LoRA directory, or a LoRA variant the engine does not apply.
    """
    path = Path(path)
    cfg_file, weights = path / "adapter_config.json", path / ADAPTER_WEIGHTS
    if not cfg_file.is_file() or not weights.is_file():
        raise ValueError(f"adapter '{path}' needs adapter_config.json and {ADAPTER_WEIGHTS} (PEFT format)")
    cfg = json.loads(cfg_file.read_text())
    unsupported = {k: cfg.get(k) for k in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save")
                   if cfg.get(k)}
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("bias", "none") != "none" or unsupported:
        raise ValueError(f"adapter '{path}' uses {unsupported or cfg.get('peft_type') or cfg.get('bias')}; valid: "
                         f"plain LoRA (peft_type LORA, bias none, no DoRA / rank or alpha patterns)")
    targets = cfg.get("target_modules") or []
    targets = tuple(sorted({t.rsplit(".", 1)[-1] for t in ([targets] if isinstance(targets, str) else targets)}))
    rank, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    return AdapterSpec(path, rank, scale, targets, weights.stat().st_size)


class MultiLora:
    """Stacked LoRA weights of ``max_adapters`` slots (+ slot 0, all zeros) for every layer.

    Per layer and group (see `GROUPS`): ``A`` (S + 1, P * r_max, K) with the P projections' A
    stacked, ``B`` one (S + 1, N_p, r_max) per projection, and ``scale`` (S + 1,). The weights are
    stored in ``dtype`` (`slot_dtype`); the update is computed in the activations' float dtype.
    """

    def __init__(self, model: nn.Module, targets: tuple[str, ...], max_adapters: int, max_rank: int,
                 dtype: torch.dtype = torch.float32):
        bad = [t for t in targets if t not in PROJ_PARENT]
        if bad or not targets:
            raise ValueError(f"lora targets {bad or targets} are not Llama projections; valid: {', '.join(PROJ_PARENT)}")
        self.targets, self.max_rank, self.num_slots = tuple(targets), max_rank, max_adapters + 1
        self.dtype = dtype
        layers = model.model.layers
        param = next(model.parameters())
        self.groups = {g: projs for g, projs in GROUPS.items() if any(p in targets for p in projs)}
        self.A: dict[str, torch.Tensor] = {}  # "<group>.<layer>" -> (S + 1, P * r_max, K)
        self.B: dict[str, torch.Tensor] = {}  # "<proj>.<layer>" -> (S + 1, N_p, r_max)
        for g, projs in self.groups.items():
            for i, layer in enumerate(layers):
                mods = [getattr(getattr(layer, PROJ_PARENT[p]), p) for p in projs]
                k = mods[0].in_features
                shape = (self.num_slots, len(projs) * max_rank, k)
                self.A[f"{g}.{i}"] = torch.zeros(shape, dtype=dtype, device=param.device)
                for p, m in zip(projs, mods):
                    # stored (S + 1, r_max, N_p), used as its (S + 1, N_p, r_max) transpose: lora_bgmv's
                    # expand then runs over contiguous outputs
                    self.B[f"{p}.{i}"] = torch.zeros(self.num_slots, max_rank, m.out_features, dtype=dtype,
                                                     device=param.device).transpose(1, 2)
        self.scale = torch.zeros(self.num_slots, device=param.device)  # (S + 1,)
        # lora_bgmv's operands per (group, layer), looked up once per call instead of rebuilt
        self._bgmv_args = {(g, i): (self.A[f"{g}.{i}"], [self.B[f"{p}.{i}"] for p in projs],
                                    sum(self.B[f"{p}.{i}"].shape[1] for p in projs))
                           for g, projs in self.groups.items() for i in range(len(layers))}
        self._native: bool | None = None
        self._slot_rows: dict[tuple[int, int], torch.Tensor] = {}

    def layer_view(self, i: int) -> MultiLora:
        """These slots seen as a one-layer model's: layer ``i``'s stacks under layer index 0 (the same
        tensors, so loads and evictions show through). Every layer's view has the same structure,
        which is what lets one compiled layer graph serve them all."""
        view = copy.copy(self)
        view.A = {f"{g}.0": self.A[f"{g}.{i}"] for g in self.groups}
        view.B = {f"{p}.0": self.B[f"{p}.{i}"] for projs in self.groups.values() for p in projs}
        view._bgmv_args = {(g, 0): self._bgmv_args[(g, i)] for g in self.groups}
        return view

    @property
    def slot_bytes(self) -> int:
        """Bytes one adapter slot occupies (all layers, padded to ``max_rank``)."""
        return sum(t[0].numel() * t.element_size() for t in (*self.A.values(), *self.B.values()))

    def check(self, spec: AdapterSpec) -> None:
        """Raises ValueError when ``spec`` does not fit the slots (rank, target modules)."""
        extra = [t for t in spec.targets if t not in self.targets]
        if spec.rank > self.max_rank or extra:
            raise ValueError(f"adapter '{spec.path}' (r={spec.rank}, targets {list(spec.targets)}) does not fit the "
                             f"engine's LoRA slots; valid: r <= max_lora_rank={self.max_rank} and targets within "
                             f"{list(self.targets)}")

    @torch.no_grad()
    def load(self, slot: int, spec: AdapterSpec) -> None:
        """Copies an adapter's weights into ``slot`` (1..S), zeroing what it does not adapt."""
        from safetensors.torch import load_file

        self.check(spec)
        # "base_model.model.model.layers.3.mlp.up_proj.lora_A.weight" -> "layers.3.mlp.up_proj.lora_A"
        state = {k[k.index("layers."):].replace(".default", "").removesuffix(".weight"): v
                 for k, v in load_file(str(spec.path / ADAPTER_WEIGHTS)).items() if "layers." in k}
        r, seen = spec.rank, 0
        for g, projs in self.groups.items():
            for key, a_stack in self.A.items():
                if not key.startswith(g + "."):
                    continue
                i = key.split(".")[1]
                a_stack[slot].zero_()
                for j, p in enumerate(projs):
                    b_stack = self.B[f"{p}.{i}"]
                    b_stack[slot].zero_()
                    name = f"layers.{i}.{PROJ_PARENT[p]}.{p}"
                    a, b = state.get(f"{name}.lora_A"), state.get(f"{name}.lora_B")
                    if a is None or b is None:
                        continue
                    a_stack[slot, j * self.max_rank: j * self.max_rank + r] = a
                    b_stack[slot, :, :r] = b
                    seen += 1
        if not seen:
            raise ValueError(f"adapter '{spec.path}' holds no lora_A/lora_B weights for layers.<i>.<proj>")
        self.scale[slot] = spec.scale

    def _bgmv_serves(self, x: torch.Tensor) -> bool:
        """Whether the compiled ``lora_bgmv`` op serves this eager decode step: a float32 CPU batch,
        the native library loaded, not being traced (compiled graphs keep the torch ops, which
        Inductor fuses into one reduction)."""
        if not x.is_cpu or x.dtype is not torch.float32 or torch.compiler.is_compiling():
            return False
        if self._native is None:
            from ops.native_build import backend

            self._native = "cpu" in backend().devices
        return self._native

    def bgmv_operands(self, group: str, i: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``lora_bgmv``'s A and Bs of one group of layer ``i`` (the slot tensors themselves: loads show through)."""
        a, bs, _ = self._bgmv_args[(group, i)]
        return a, bs

    def uniform_slots(self, slot: int, rows: int) -> torch.Tensor:
        """(rows,) int64 filled with ``slot``, cached: the slots of a step whose rows share one adapter."""
        key = (slot, rows)
        if key not in self._slot_rows:
            self._slot_rows[key] = torch.full((rows,), slot, dtype=torch.long)
        return self._slot_rows[key]

    def add_delta_(self, group: str, i: int, x: torch.Tensor, slots: torch.Tensor | int, out: torch.Tensor) -> None:
        """``out += delta(...)`` for one decode step, in place where ``lora_bgmv`` serves (no temporary).

        Args:
            x: (B, K) the group's input, one token per row.
            slots: (B,) slot of each row (0: no adapter), or one int slot that every row uses.
            out: (B, sum N_p) contiguous: the group's base projection output.
        """
        if self._bgmv_serves(x):
            rows = x.shape[0]
            if isinstance(slots, int):  # one adapter on every row: lora_bgmv reads it once per step too
                slots = self.uniform_slots(slots, rows)
            a, bs, _ = self._bgmv_args[(group, i)]
            torch.ops.raylm.lora_bgmv(out, x, a, bs, slots, self.scale, self.max_rank)
            return
        out += self.delta(group, i, x[:, None], slots)[:, 0]

    def delta(self, group: str, i: int, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """The LoRA update of one group's projections, outputs concatenated like the fused base matmul.

        Args:
            x: (B, T, K) the group's input.
            slots: (B,) slot of each row (0: no adapter), or one int slot that every row uses.

        Returns:
            (B, T, sum N_p) ``scale * B (A x)`` per row.
        """
        projs = self.groups[group]
        if x.shape[1] == 1 and self._bgmv_serves(x):
            rows = x.shape[0]
            if isinstance(slots, int):
                slots = self.uniform_slots(slots, rows)
            # eager decode: one compiled op reads each row's adapter in place (lora_bgmv in native/)
            a, bs, width = self._bgmv_args[(group, i)]
            out = x.new_zeros(rows, width)
            torch.ops.raylm.lora_bgmv(out, x[:, 0], a, bs, slots, self.scale, self.max_rank)
            return out[:, None, :]
        dt = x.dtype
        if isinstance(slots, int):  # every row on this one slot (eager): its weights as views, plain matmuls
            xa = (x @ self.A[f"{group}.{i}"][slots].T.to(dt)) * self.scale[slots]  # (B, T, P * r)
            return torch.cat([h @ self.B[f"{p}.{i}"][slots].T.to(dt)
                              for h, p in zip(xa.split(self.max_rank, -1), projs)], -1)  # (B, T, sum N_p)
        A = self.A[f"{group}.{i}"][slots]  # (B, P * r, K)
        Bs = [self.B[f"{p}.{i}"][slots] for p in projs]  # (B, N_p, r) each
        if x.shape[1] == 1:
            # decode: broadcast-multiply + sum, which Inductor fuses into one reduction with indirect
            # loads (no gathered copy of the weights); a bmm would first materialize A[slots]
            xa = (x[:, 0, None, :] * A).sum(-1)  # (B, P * r)
            outs = [(h[:, None, :] * b).sum(-1) for h, b in zip(xa.split(self.max_rank, -1), Bs)]  # (B, N_p)
            return (torch.cat(outs, -1) * self.scale[slots][:, None])[:, None, :]
        xa = x @ A.transpose(1, 2).to(dt)  # (B, T, P * r)
        outs = [h @ b.transpose(1, 2).to(dt) for h, b in zip(xa.split(self.max_rank, -1), Bs)]  # (B, T, N_p)
        return torch.cat(outs, -1) * self.scale[slots][:, None, None]


class AdapterRegistry:
    """Adapters by name: paths registered up front, weights resident in `MultiLora` slots, LRU eviction.

    Slots in use by running requests are pinned; `acquire` returns None when every slot is pinned
    (the request waits for one). The bound on memory is ``max_adapters * slot_bytes``, allocated once.
    """

    def __init__(self, lora: MultiLora):
        self.lora = lora
        self.specs: dict[str, AdapterSpec] = {}
        self.resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self.pins = [0] * lora.num_slots
        self.loads = 0
        self.evictions = 0
        # Per adapter, for the serving metrics (tagged by adapter name).
        self.loads_by_name: Counter[str] = Counter()
        self.evictions_by_name: Counter[str] = Counter()

    def add(self, name: str, path: str | os.PathLike) -> AdapterSpec:
        """Registers (or re-registers) adapter ``name`` at ``path``; its weights load at first use.

        Raises:
            ValueError: not a plain PEFT LoRA adapter, or one that does not fit the slots.
        """
        spec = read_adapter_spec(path)
        self.lora.check(spec)
        if name in self.specs and self.specs[name].path != spec.path and name in self.resident \
                and not self.pins[self.resident[name]]:
            self.resident.pop(name)  # another directory under this name: reload at next use
        self.specs[name] = spec
        return spec

    def acquire(self, name: str) -> int | None:
        """Pins ``name``'s slot, loading it (evicting the least recently used unpinned adapter) if needed.

        Raises:
            KeyError: ``name`` was never registered with `add`.
        """
        spec = self.specs[name]
        if name in self.resident:
            self.resident.move_to_end(name)
        else:
            used = set(self.resident.values())
            free = [s for s in range(1, self.lora.num_slots) if s not in used]
            if not free:
                victim = next((n for n, s in self.resident.items() if not self.pins[s]), None)
                if victim is None:
                    return None
                free = [self.resident.pop(victim)]
                self.evictions += 1
                self.evictions_by_name[victim] += 1
            self.lora.load(free[0], spec)
            self.resident[name] = free[0]
            self.loads += 1
            self.loads_by_name[name] += 1
        slot = self.resident[name]
        self.pins[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        """Unpins a slot taken with `acquire` (slot 0, no adapter, is ignored)."""
        if slot:
            self.pins[slot] -= 1

    def stats(self) -> dict[str, object]:
        """Counters for metrics: resident names (LRU first), loads, evictions, capacity and slot bytes."""
        return {"resident": list(self.resident), "loads": self.loads, "evictions": self.evictions,
                "capacity": self.lora.num_slots - 1, "slot_bytes": self.lora.slot_bytes,
                "slot_dtype": str(self.lora.dtype).removeprefix("torch.")}
