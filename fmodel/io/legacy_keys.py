"""Old tensor-name spellings and their modern names (Transformers' `_fix_state_dict_key_on_load`)."""

from __future__ import annotations

__all__ = ["modern_key"]

# suffix on disk -> suffix now. TF-ported checkpoints (early BERT) spell LayerNorm's tensors
# gamma/beta; torch's weight_norm moved from weight_g/weight_v to parametrizations.
_SUFFIXES = (
    ("LayerNorm.beta", "LayerNorm.bias"),
    ("LayerNorm.gamma", "LayerNorm.weight"),
    ("weight_g", "parametrizations.weight.original0"),
    ("weight_v", "parametrizations.weight.original1"),
)


def modern_key(key: str) -> tuple[str, bool]:
    """`(new_key, changed)`: the name a legacy checkpoint key has today. Pure; equal to
    Transformers 4.57's `_fix_state_dict_key_on_load` on the torch versions fmodel supports."""
    for old, new in _SUFFIXES:
        if key.endswith(old):
            return key[: -len(old)] + new, True
    return key, False
