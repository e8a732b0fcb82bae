"""`SurgeryMixin`: embeddings, heads, ties, pruning and (re)initialisation for the facade; each
method is one pure transform (`fmodel.transforms`) whose result is installed."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .. import transforms
from ..models import get_spec

if TYPE_CHECKING:
    from .model import PreTrainedModel

__all__ = ["SurgeryMixin"]


class SurgeryMixin:
    """Embedding and weight surgery; the host class provides `state`, `_install`, `_apply_transform`."""

    def resize_token_embeddings(
        self,
        new_num_tokens: int | None = None,
        pad_to_multiple_of: int | None = None,
        mean_resizing: bool = True,
    ) -> nn.Module:
        self._apply_transform(
            transforms.resize_token_embeddings,
            new_num_tokens,
            pad_to_multiple_of=pad_to_multiple_of,
            mean_resizing=mean_resizing,
        )
        return self.get_input_embeddings()

    def prune_heads(self, heads_to_prune: dict[int, list[int]]) -> None:
        self._apply_transform(transforms.prune_heads, heads_to_prune)

    def tie_weights(self) -> None:
        self._apply_transform(transforms.tie_weights)

    def get_decoder(self) -> nn.Module:
        return self.base_model

    def set_decoder(self, decoder: nn.Module) -> None:
        spec = get_spec(self._architecture)
        if spec.is_base:
            raise ValueError("set_decoder: a base model is its own decoder")
        prefix = spec.prefix + "."
        params = {prefix + n: p for n, p in decoder.named_parameters(remove_duplicate=False)}
        self._apply_transform(
            transforms.replace_params, {n: p for n, p in params.items() if n not in self._ties}
        )

    def get_input_embeddings(self) -> nn.Module:
        return self.get_submodule(get_spec(self._architecture).input_embeddings.rsplit(".", 1)[0])

    def set_input_embeddings(self, value: nn.Module) -> None:
        """Use `value.weight` [vocab', hidden] as the input embeddings (the module's Parameter is
        installed as is). Unlike Transformers, a tied output projection follows the new matrix
        (fmodel's ties are declared, so they hold; Transformers' lm_head keeps the old one until
        `tie_weights()`). `config.vocab_size` becomes vocab'."""
        self._apply_transform(transforms.set_input_embeddings, value.weight)

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        """Use `new_embeddings.weight` as the output projection. On a tied model another matrix
        unties it while the config still asks for the tie, as replacing Transformers' lm_head
        does: `tie_weights()` ties it again."""
        weight = new_embeddings.weight
        tied = get_spec(self._architecture).output_embeddings in self._ties
        if tied and weight is self.get_input_embeddings().weight:
            return
        state = self.state
        new = transforms.set_output_embeddings(state, weight, tie=False if tied else None)
        self._install(new.replace(config=state.config))

    def get_output_embeddings(self) -> nn.Module | None:
        name = get_spec(self._architecture).output_embeddings
        return None if name is None else self.get_submodule(name.rsplit(".", 1)[0])

    # -- weights: (re)initialisation, position embeddings, legacy names --------------------

    @property
    def base_model_prefix(self) -> str:
        return get_spec(self._architecture).prefix

    def init_weights(self) -> None:
        """As Transformers after `post_init`: every tensor is already initialised (from the
        checkpoint or the family's init rules), so nothing is redrawn; ties are re-applied.
        To redraw, use `model.apply(model._init_weights)` or `fmodel.init_weights(state)`."""
        self.tie_weights()

    def _init_weights(self, module: nn.Module) -> None:
        """Redraw `module`'s own parameters (not its children's) by the family's init rules, in
        place, from torch's global RNG (so `torch.manual_seed` makes it reproducible).
        A tied alias redraws its source."""
        prefix = next((n for n, m in self.named_modules() if m is module), None)
        if prefix is None:
            raise ValueError(f"_init_weights: {type(module).__name__} is not a submodule of this model")
        names = {
            self._ties.get(full, full)
            for leaf, _ in module.named_parameters(recurse=False)
            for full in [f"{prefix}.{leaf}" if prefix else leaf]
        }
        if names:
            seed = int(torch.randint(0, 2**62, ()).item())
            self._write_values(transforms.init_weights(self.state, seed=seed, names=sorted(names)))

    def resize_position_embeddings(self, new_num_position_embeddings: int) -> None:
        """Accept `new_num_position_embeddings` positions (see `fmodel.resize_position_embeddings`;
        Transformers' base class raises for most families, fmodel implements it for all)."""
        self._apply_transform(transforms.resize_position_embeddings, new_num_position_embeddings)

    def get_position_embeddings(self) -> nn.Embedding:
        """The learned position embedding module (GPT-2, BERT).

        Raises:
            ValueError: the family uses rotary positions (no position weights).
        """
        name = get_spec(self._architecture).position_embeddings
        if name is None:
            raise ValueError(f"{self._architecture} has rotary positions: there is no position embedding")
        return self.get_submodule(name.rsplit(".", 1)[0])

    def dequantize(self) -> PreTrainedModel:
        """Undo quantization (`fmodel.dequantize`) and return the model. Raises ValueError for a
        model that is not quantized (as Transformers)."""
        if not transforms.is_quantized(self.state):
            raise ValueError("You need to first quantize your model in order to dequantize it")
        self._apply_transform(transforms.dequantize)
        return self
