"""`ForwardMixin`: the facade's Transformers-shaped `forward`: the module tree runs with its own
parameters (hooks, adapters and `torch.func.functional_call` act as on any module), outputs are
Transformers' classes, losses are `fmodel.losses` with Trainer's `num_items_in_batch`."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from .. import losses
from ..errors import ArgumentTypeError
from ..forward import prepare_call, to_output
from ..generation.cache import KVCache, init_cache
from ..models import get_spec
from ..state import quantization_entries
from .arg_checks import check_model_inputs
from .outputs import output_class

__all__ = ["ForwardMixin"]


class ForwardMixin:
    """`forward`, the loss attributes Trainer reads; the host class provides `config`, `_tree`,
    `_frozen_config`, `_architecture`, `_attn_implementation` and `is_gradient_checkpointing`."""

    @property
    def accepts_loss_kwargs(self) -> bool:
        """Whether `forward` uses Trainer's `num_items_in_batch` (as Transformers' class: the
        causal LMs do, BERT's heads do not)."""
        return self._frozen_config.model_type not in ("bert", "t5")

    @property
    def loss_type(self) -> str | None:
        return _LOSS_TYPES.get(get_spec(self._architecture).output)

    @property
    def loss_function(self):
        """Transformers' loss function for this head (`transformers.loss.LOSS_MAPPING`'s contract),
        computed by `fmodel.losses`."""
        return _LOSS_FUNCTIONS[get_spec(self._architecture).output]

    def _call_info(self) -> _CallInfo:
        """What `prepare_call` reads of a state, without building one (cheap, and traceable by
        torch.compile: no attrs converters in the way)."""
        if self.__dict__.get("_tp_mesh") is not None:  # tensor parallel: the state has the mesh
            return self.state  # and plan (local kv heads in the cache, the tensor-parallel skeleton)
        # the model's float dtype: not that of quantization scales (GGUF's float16 block scales)
        storage = quantization_entries(self._frozen_config)
        param = next(
            (p for n, p in self.named_parameters() if p.is_floating_point() and n not in storage),
            next((p for p in self.parameters() if p.is_floating_point()), None),
        )
        return _CallInfo(
            self._frozen_config,
            self._architecture,
            self._attn_implementation,
            torch.float32 if param is None else param.dtype,
            torch.device("cpu") if param is None else param.device,
        )

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ):
        """Transformers' forward for the family: its output class (`.logits` / `.last_hidden_state`,
        `.loss` with `labels`, Transformers' loss and `num_items_in_batch` normalisation).

        `use_cache` (default `config.use_cache` in eval mode, False in training) or a
        `past_key_values` cache returns `past_key_values`: an fmodel `KVCache`, grown as needed
        when passed back. The module tree runs with its own
        parameters (so hooks, adapters and `torch.func.functional_call` act as on any module).

        Raises:
            ArgumentTypeError / InvalidArgumentError: `input_ids` not an integer tensor [batch,
                seq] (a list, a float tensor, another rank), `inputs_embeds` not [batch, seq, hidden].
            TokenIdError: an id outside [0, vocab_size).
        """
        check_model_inputs(input_ids, inputs_embeds, labels=labels, attention_mask=attention_mask)
        return self._forward_module(
            self._tree,
            get_spec(self._architecture).output,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    def _forward_module(
        self,
        module: nn.Module,
        head: str,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ):
        """`forward` run over `module`: the whole tree with `head` its spec's output, or the base
        module inside it with `head="base"` (Transformers' `model.model(...)`, see base_call.py)."""
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        kwargs.pop("cache_position", None)  # positions follow from the cache length
        kwargs.pop("return_legacy_cache", None)
        spec = get_spec(self._architecture)
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        if output_hidden_states is None:
            output_hidden_states = config.output_hidden_states
        return_dict = config.use_return_dict if return_dict is None else return_dict
        training = module.training
        if use_cache is None:  # Transformers: config.use_cache; fmodel allocates none for training
            # (nor under torch.compile, which would trace the cache's attrs bookkeeping)
            compiled = torch.compiler.is_compiling() or "_runner" in self.__dict__
            use_cache = bool(getattr(config, "use_cache", False)) and not training and not compiled
        if self.is_gradient_checkpointing and training:
            use_cache = False
        if getattr(module, "is_encoder_decoder", False):  # T5: decoder inputs, decoder cache
            from .seq2seq_call import seq2seq_forward

            return seq2seq_forward(
                self,
                module,
                head,
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                return_dict=return_dict,
                logits_to_keep=logits_to_keep,
                kwargs=kwargs,
            )
        if getattr(module, "supports_cache", False):
            if use_cache and past_key_values is None:
                batch, length = _batch_and_length(input_ids, inputs_embeds)
                ref = input_ids if input_ids is not None else inputs_embeds  # offloaded weights: on meta
                past_key_values = init_cache(self._call_info(), batch, max(length, 1), device=ref.device)
            if past_key_values is not None:
                past_key_values = _with_room(past_key_values, _batch_and_length(input_ids, inputs_embeds)[1])
                kwargs["past_key_values"] = past_key_values
        tensor_parallel = None
        if self.__dict__.get("_tp_mesh") is not None:
            module, tensor_parallel = _tensor_parallel_module(self, module, spec, training)
        call = dict(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_hidden_states=bool(output_hidden_states),
            output_attentions=bool(output_attentions),
            logits_to_keep=logits_to_keep if head != "base" else 0,
            training=training,
            module=module,
            gradient_checkpointing=self.is_gradient_checkpointing and training,
            **kwargs,
        )
        module, args, tree_kwargs = prepare_call(self._call_info(), input_ids, **call)
        runner = self.__dict__.get("_runner") if module is self._tree else None  # a compiled tree
        if tensor_parallel is not None:
            runner = partial(functional_call, module, tensor_parallel, tie_weights=False, strict=False)
            args, tree_kwargs = (args, tree_kwargs), {}
        elif runner is None:
            runner = module
        out = to_output(runner(*args, **tree_kwargs))
        fields = {k: getattr(out, k) for k in _OUTPUT_FIELDS[head]}
        if labels is not None and out.logits is not None:
            fields["loss"] = self._loss(head, out.logits, labels, num_items_in_batch, kwargs)
            if out.aux_loss is not None:  # mixture of experts with router logits: as Transformers
                fields["loss"] = fields["loss"] + config.router_aux_loss_coef * out.aux_loss.to(
                    fields["loss"].device
                )
        cls = output_class(spec.model_type, head)
        result = cls(**{k: v for k, v in fields.items() if k in cls.__dataclass_fields__})
        return result if return_dict else result.to_tuple()

    def _loss(self, head: str, logits, labels, num_items_in_batch, kwargs) -> torch.Tensor:
        if head == "causal_lm":
            return losses.causal_lm_loss(
                logits, labels, num_items_in_batch=num_items_in_batch, shift_labels=kwargs.get("shift_labels")
            )
        if head == "masked_lm":  # BERT computes a plain mean (no num_items_in_batch)
            return losses.masked_lm_loss(logits, labels)
        num_labels = logits.shape[-1]
        if self.config.problem_type is None:  # inferred once and recorded, as Transformers
            self.config.problem_type = losses.sequence_classification_problem(num_labels, labels)
        return losses.sequence_classification_loss(
            logits, labels, num_labels=num_labels, problem_type=self.config.problem_type
        )


class _CallInfo:
    """The part of a `ModelState` that `fmodel.forward.prepare_call` reads (no tensors: the
    model is not tensor parallel, `fmodel.distributed.distribute.mesh_of` finds no mesh)."""

    __slots__ = ("architecture", "attn_implementation", "config", "device", "dtype")

    def __init__(self, config, architecture: str, attn_implementation: str, dtype, device) -> None:
        self.config = config
        self.architecture = architecture
        self.attn_implementation = attn_implementation
        self.dtype = dtype
        self.device = device

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return {}  # a fresh dict (torch.compile traces it; a shared read-only proxy it refuses)


def _tensor_parallel_module(model, module: nn.Module, spec, training: bool):
    """For a tensor-parallel model: the tensor-parallel skeleton (or its base module, when
    `module` is the facade's base module) and this rank's local tensors under its names. The
    facade's own tree is not run then: hooks registered on its submodules do not fire."""
    from ..distributed.distribute import local_tensors, tp_skeleton

    state = model.state
    root, tensors = tp_skeleton(state, training), local_tensors(state)
    if module is model._tree:
        return root, tensors
    prefix = spec.prefix + "."
    return getattr(root, spec.prefix), {
        k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)
    }


def _batch_and_length(input_ids, inputs_embeds) -> tuple[int, int]:
    ref = input_ids if input_ids is not None else inputs_embeds
    return ref.shape[0], ref.shape[1]


def _with_room(cache: KVCache, new_tokens: int) -> KVCache:
    """`cache`, or a copy with larger buffers when `new_tokens` more would not fit (the facade's
    caches grow as Transformers' DynamicCache does; fmodel.forward's are fixed-size)."""
    if not isinstance(cache, KVCache):
        raise ArgumentTypeError(
            f"past_key_values: expected an fmodel KVCache (from a previous call with use_cache=True "
            f"or fmodel.init_cache), got {type(cache).__name__}"
        )
    need = cache.length + new_tokens
    if need <= cache.max_length:
        return cache
    size = max(need, 2 * cache.max_length)

    def grown(buf: torch.Tensor) -> torch.Tensor:
        out = buf.new_zeros(*buf.shape[:2], size, buf.shape[3])
        out[:, :, : cache.length] = buf[:, :, : cache.length]
        return out

    return KVCache(tuple(map(grown, cache.keys)), tuple(map(grown, cache.values)), cache.length)


def _causal_lm_loss(
    logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100, shift_labels=None, **kwargs
):
    return losses.causal_lm_loss(
        logits,
        labels,
        num_items_in_batch=num_items_in_batch,
        ignore_index=ignore_index,
        shift_labels=shift_labels,
    )


def _masked_lm_loss(logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100, **kwargs):
    return losses.masked_lm_loss(
        logits, labels, num_items_in_batch=num_items_in_batch, ignore_index=ignore_index
    )


def _sequence_classification_loss(labels, pooled_logits, config, **kwargs):
    num_labels = config.num_labels
    if config.problem_type is None:
        config.problem_type = losses.sequence_classification_problem(num_labels, labels)
    return losses.sequence_classification_loss(
        pooled_logits, labels, num_labels=num_labels, problem_type=config.problem_type, **kwargs
    )


_LOSS_TYPES = {
    "causal_lm": "ForCausalLM",
    "masked_lm": "ForMaskedLM",
    "sequence_classification": "ForSequenceClassification",
    "seq2seq_lm": "ForConditionalGeneration",
}
_LOSS_FUNCTIONS = {
    "causal_lm": _causal_lm_loss,
    "masked_lm": _masked_lm_loss,
    "sequence_classification": _sequence_classification_loss,
    "base": _causal_lm_loss,  # Transformers' fallback for a class without a loss type
    "seq2seq_lm": _masked_lm_loss,  # T5's own loss: no shift (the decoder inputs are shifted)
}


# The fields of Transformers' output class for each head (CausalLMOutputWithPast, ...), in order.
_OUTPUT_FIELDS = {
    "causal_lm": ("logits", "past_key_values", "hidden_states", "attentions", "aux_loss", "router_logits"),
    "masked_lm": ("logits", "hidden_states", "attentions"),
    "sequence_classification": ("logits", "hidden_states", "attentions"),
    "base": (
        "last_hidden_state",
        "pooler_output",
        "past_key_values",
        "hidden_states",
        "attentions",
        "router_logits",
    ),
}
