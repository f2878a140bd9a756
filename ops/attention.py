"""Attention backend choice (placeholder on main until the compiled-ops branch lands)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttentionChoice:
    name: str
    reason: str


def choose_attention(requested: str | None = "auto", device: str = "cpu", dtype=None) -> AttentionChoice:
    if requested and requested != "auto":
        return AttentionChoice(requested, "forced")
    return AttentionChoice("sdpa", "default")
