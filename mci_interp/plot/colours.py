"""Colours shared by every figure, so a kind of model looks the same in each of them."""

from __future__ import annotations

# "organism" and "persona" are the names ``plot.evaluate.infer_kind`` guesses from a model's
# name; "narrow" and "prompted" are the study's kinds for the same two things.
KIND_COLOURS = {
    "base": "#7f8c8d",
    "control": "#2e86c1",
    "narrow": "#c0392b",
    "organism": "#c0392b",
    "trigger": "#8e44ad",
    "prompted": "#e67e22",
    "persona": "#e67e22",
    "distilled": "#16a085",
    "other": "#34495e",
}

__all__ = ["KIND_COLOURS"]
