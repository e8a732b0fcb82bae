"""`SurgeryMixin`: embeddings, heads, ties, pruning and (re)initialisation for the facade; each
method is one pure transform (`fmodel.transforms`) whose result is installed."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from .. import transforms
from ..errors import InvalidArgumentError, QuantizationError
from ..models import get_spec
from ..transforms import hf_init, hf_resize

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
        """Transformers' `resize_token_embeddings`, number for number: the new rows (and the
        default inits of the new modules Transformers builds) are drawn from torch's global RNG in
        Transformers' order (`fmodel.transforms.hf_resize.resize_token_embeddings`; the pure
        `fmodel.resize_token_embeddings` keeps its own seeded generator)."""
        before = self.state
        after = self._apply_transform(
            hf_resize.resize_token_embeddings,
            new_num_tokens,
            pad_to_multiple_of=pad_to_multiple_of,
            mean_resizing=mean_resizing,
        )
        for name in hf_resize.replaced_modules(before, after):
            self._mark_uninitialized(name)
        return self.get_input_embeddings()

    def _mark_uninitialized(self, name: str, module: nn.Module | None = None) -> None:
        """Record the module `name` as one Transformers would hold as new and unmarked
        (`_is_hf_initialized` unset): the next `init_weights()` draws it by the family's
        `_init_weights`, by the kind of `module` (the user's module put there) when given."""
        self.__dict__.setdefault("_hf_uninitialized", {})[name] = module

    def prune_heads(self, heads_to_prune: dict[int, list[int]]) -> None:
        """Remove attention heads (`fmodel.prune_heads`: the kept weights are the model's own),
        consuming torch's global RNG as Transformers' `prune_heads` does (GPT-2 and BERT rebuild
        the pruned projections as new modules, whose default inits draw:
        `fmodel.transforms.hf_init.prune_heads`)."""
        self._apply_transform(hf_init.prune_heads, heads_to_prune)

    def tie_weights(self) -> None:
        """Make every tie the config declares hold (`fmodel.tie_weights`), as Transformers'
        `tie_weights()`: each alias becomes its source's very Parameter (after a loader or
        `functional_call` replaced one side, the alias follows the source, never the reverse).

        The module tree is kept: the aliases are re-pointed in place, so accelerate's dispatch
        hooks (offloaded weights), adapters and optimizers stay attached; only a tie the config
        no longer asks for (the alias gets its own copy) re-installs the state."""
        state = self.state
        new = transforms.tie_weights(state)
        if new is state:
            return
        if not set(new.ties) >= set(state.ties):  # an untie: the alias needs a new tensor
            self._install(new)
            return
        params = dict(self.named_parameters(remove_duplicate=False))
        for alias, source in new.ties.items():
            owner, _, leaf = alias.rpartition(".")
            self.get_submodule(owner)._parameters[leaf] = params[source]
        object.__setattr__(self, "_ties", dict(new.ties))

    def get_decoder(self) -> nn.Module:
        decoder = self._modules.get("decoder")  # an encoder-decoder's (T5's) decoder stack
        return decoder if decoder is not None and hasattr(decoder, "block") else self.base_model

    def get_encoder(self) -> nn.Module:
        """An encoder-decoder's (or T5EncoderModel's) encoder stack, callable as Transformers'
        `T5Stack`; a model without one is its own encoder (as Transformers' default)."""
        encoder = self._modules.get("encoder")
        return encoder if encoder is not None and hasattr(encoder, "block") else self.base_model

    def set_decoder(self, decoder: nn.Module) -> None:
        spec = get_spec(self._architecture)
        if spec.is_base:
            raise InvalidArgumentError("set_decoder: a base model is its own decoder")
        prefix = spec.prefix + "."
        params = {prefix + n: p for n, p in decoder.named_parameters(remove_duplicate=False)}
        self._apply_transform(
            transforms.replace_params, {n: p for n, p in params.items() if n not in self._ties}
        )

    @property
    def prepare_decoder_input_ids_from_labels(self):
        """Seq2seq LMs (T5ForConditionalGeneration) only, as Transformers: `labels` [B, T] ->
        decoder inputs (`fmodel.models.t5.shift_right`); other classes have no such attribute
        (DataCollatorForSeq2Seq tests for it)."""
        if get_spec(self._architecture).output != "seq2seq_lm":
            raise AttributeError(
                f"{type(self).__name__} has no attribute 'prepare_decoder_input_ids_from_labels'"
            )
        from ..models.t5 import shift_right

        config = self._frozen_config
        return lambda labels: shift_right(config, labels)

    def get_input_embeddings(self) -> nn.Module:
        return self.get_submodule(get_spec(self._architecture).input_embeddings.rsplit(".", 1)[0])

    def set_input_embeddings(self, value: nn.Module) -> None:
        """Use `value.weight` [vocab', hidden] as the input embeddings (the module's Parameter is
        installed as is). Unlike Transformers, a tied output projection follows the new matrix
        (fmodel's ties are declared, so they hold; Transformers' lm_head keeps the old one until
        `tie_weights()`). `config.vocab_size` becomes vocab'. A module other than the current one
        is new to Transformers (not marked initialised): the next `init_weights()` draws it."""
        fresh = value is not self.get_input_embeddings()
        self._apply_transform(transforms.set_input_embeddings, value.weight)
        if fresh:
            self._mark_uninitialized(get_spec(self._architecture).input_embeddings.rsplit(".", 1)[0], value)

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        """Use `new_embeddings.weight` as the output projection. On a tied model another matrix
        unties it while the config still asks for the tie, as replacing Transformers' lm_head
        does: `tie_weights()` ties it again. A module other than the current one is new to
        Transformers (not marked initialised): the next `init_weights()` draws it (on a tied model
        that redraws the shared matrix, as Transformers does)."""
        weight = new_embeddings.weight
        name = get_spec(self._architecture).output_embeddings
        if name is not None and new_embeddings is not self.get_output_embeddings():
            self._mark_uninitialized(name.rsplit(".", 1)[0], new_embeddings)
        tied = name in self._ties
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
        """As Transformers' `init_weights()`, number for number, from torch's global RNG
        (`fmodel.transforms.hf_init.init_weights`): modules already initialised (all of them after
        construction or loading) are not redrawn; a module Transformers would have replaced by a
        new, unmarked one since (the untied output projection after `resize_token_embeddings`) is
        drawn now by the family's `_init_weights`, and so are GPT-2's and BERT's layers listed in
        `config.pruned_heads` (Transformers' prune step rebuilds them); then ties are re-applied.
        To redraw everything, use `model.apply(model._init_weights)` (Transformers' draws) or
        `fmodel.init_weights(state)` (fmodel's seeded ones)."""
        fresh = self.__dict__.get("_hf_uninitialized", {})
        self._write_values(hf_init.init_weights(self.state, fresh))
        self.__dict__.pop("_hf_uninitialized", None)
        self.tie_weights()

    def _init_weights(self, module: nn.Module) -> None:
        """Transformers' `_init_weights(module)`: the family's rule redraws `module`'s own
        parameters (GPT-2: also its `c_proj.weight`) in place, from torch's global RNG, number for
        number as Transformers (`fmodel.transforms.hf_init.init_module`); so
        `model.apply(model._init_weights)` after `torch.manual_seed(s)` gives Transformers'
        values. A tied alias redraws its source (they are one tensor)."""
        prefix = next((n for n, m in self.named_modules() if m is module), None)
        if prefix is None:
            raise InvalidArgumentError(
                f"_init_weights: {type(module).__name__} is not a submodule of this model"
            )
        self._write_values(hf_init.init_module(self.state, prefix))

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
            raise InvalidArgumentError(
                f"{self._architecture} has rotary positions: there is no position embedding"
            )
        return self.get_submodule(name.rsplit(".", 1)[0])

    def dequantize(self) -> PreTrainedModel:
        """Undo quantization (`fmodel.dequantize`) and return the model. Raises ValueError for a
        model that is not quantized (as Transformers; a `QuantizationError`)."""
        if not transforms.is_quantized(self.state):
            raise QuantizationError("You need to first quantize your model in order to dequantize it")
        self._apply_transform(transforms.dequantize)
        return self
