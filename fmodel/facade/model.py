"""`PreTrainedModel`: the stateful, Transformers-compatible facade over a `ModelState`.

The module tree is the family's skeleton with the state's own tensors installed as
`nn.Parameter`s (same storage, Transformers' names), so `parameters()`, `state_dict()`,
`torch.optim` and `loss.backward()` work as users expect. Every call to `forward` runs the
functional `fmodel.forward` over `self.state`, which is rebuilt from the module's current
parameters: an optimizer's in-place update is therefore visible in `model.state` right away
(the state shares those tensors; take `fmodel.to(model.state, ...)` or a clone to freeze a copy).
Methods that change the model call a pure transform and install its result.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .. import losses, transforms
from ..cache import KVCache, init_cache
from ..errors import ConfigError
from ..forward import prepare_call, to_output
from ..models import get_spec
from ..models.skeleton import _SkipInit, build_module, expected_shapes, skeleton
from ..state import ModelState
from .attention_choice import AttentionMixin
from .base_call import bind_base_call, plain_class
from .config_view import ConfigView, as_fmodel_config, view_class
from .counting import CountingMixin
from .devices import DeviceMixin, empty_state, registers_on_meta
from .generation import GenerationMixin
from .hub import HubMixin
from .interop import interop_class
from .loading import LoadingMixin
from .mask_helpers import MaskHelpersMixin
from .outputs import output_class
from .surgery import SurgeryMixin
from .training import TrainingMixin

__all__ = ["PreTrainedModel"]


class PreTrainedModel(
    LoadingMixin,
    HubMixin,
    SurgeryMixin,
    AttentionMixin,
    CountingMixin,
    DeviceMixin,
    TrainingMixin,
    MaskHelpersMixin,
    GenerationMixin,
    nn.Module,
):
    """A stateful model with the Transformers `PreTrainedModel` API, backed by a `ModelState`.

    Subclasses name their architecture (`LlamaForCausalLM`, ...); `PreTrainedModel` itself
    takes the architecture from the config or the checkpoint.
    """

    architecture: ClassVar[str | None] = None
    # Transformers' base-class attributes that clients read (values as Transformers 4.57's
    # classes for fmodel's families; the family-specific ones are properties below).
    main_input_name: ClassVar[str] = "input_ids"
    supports_gradient_checkpointing: ClassVar[bool] = True
    is_parallelizable: ClassVar[bool] = False
    _supports_sdpa: ClassVar[bool] = True
    _supports_flash_attn: ClassVar[bool] = True
    _supports_flex_attn: ClassVar[bool] = True
    _supports_attention_backend: ClassVar[bool] = True
    _can_compile_fullgraph: ClassVar[bool] = True
    _is_stateful: ClassVar[bool] = False
    _keep_in_fp32_modules: ClassVar[list[str] | None] = None
    _keep_in_fp32_modules_strict: ClassVar[list[str] | None] = None
    _keys_to_ignore_on_save: ClassVar[list[str] | None] = None
    _keys_to_ignore_on_load_missing: ClassVar[list[str] | None] = None
    _keys_to_ignore_on_load_unexpected: ClassVar[list[str] | None] = None
    _skip_keys_device_placement: ClassVar[Any] = None
    _checkpoint_conversion_mapping: ClassVar[dict[str, str]] = {}
    _tp_plan: ClassVar[Any] = None
    _pp_plan: ClassVar[Any] = None
    _tp_size: ClassVar[Any] = None
    _hf_peft_config_loaded: ClassVar[bool] = False

    def __new__(cls, *args: Any, **kwargs: Any):
        # With Transformers installed, an instance of a subclass that is also a
        # `transformers.PreTrainedModel` (see interop.py for why).
        return super().__new__(interop_class(cls))

    def __reduce_ex__(self, protocol: int):
        # pickle by the fmodel class (the interop subclass is rebuilt by `__new__`)
        fn, args, *rest = super().__reduce_ex__(protocol)
        base = getattr(type(self), "_fmodel_class", None)
        if base is not None and args and args[0] is type(self):
            return (_new_instance, (base, *args[1:]), *rest)
        return (fn, args, *rest)

    def __init__(self, config: Any = None, *inputs: Any, state: ModelState | None = None) -> None:
        """A model from `config` (fmodel's, a `ConfigView`, a Transformers config or a dict) with
        fresh weights, or wrapping `state` (then `config` may be None)."""
        nn.Module.__init__(self)
        if inputs:
            raise TypeError(f"{type(self).__name__}() takes one config, got {len(inputs)} more arguments")
        if state is None:
            if config is None:
                raise TypeError(f"{type(self).__name__}() needs a config (or state=)")
            frozen = as_fmodel_config(config)
            if registers_on_meta():  # accelerate's init_empty_weights: no values to draw
                state = empty_state(frozen, self._architecture_for(frozen))
            else:
                state = transforms.init(
                    frozen, architecture=self._architecture_for(frozen), draw_order="transformers"
                )
        fresh = state is None
        runtime = dict(config._runtime) if isinstance(config, ConfigView) else {}
        self.__dict__["_config_view"] = view_class(state.config)(self, **runtime)
        self.__dict__["warnings_issued"] = {}
        self._install(state)
        self.train(fresh)  # as Transformers: a new model trains, a loaded one (from_state) evaluates

    # -- the config view ------------------------------------------------------------------

    @property
    def config(self) -> ConfigView:
        """The model's config, mutable as Transformers' (`model.config.pad_token_id = 0`): a
        view of `self.state.config`; each write installs a new state (see `ConfigView`)."""
        return self.__dict__["_config_view"]

    @config.setter
    def config(self, value: Any) -> None:
        self._replace_config(as_fmodel_config(value))

    @property
    def name_or_path(self) -> str:
        return self.config.name_or_path

    @name_or_path.setter
    def name_or_path(self, value: str) -> None:
        self.config.name_or_path = value

    def _replace_config(self, new) -> None:
        """Make `new` (a frozen config) this model's config, in place: every module of the tree
        takes the new config and the plain attributes a fresh skeleton of `new` has (an `eps`,
        a `padding_idx`), computed buffers are recomputed (rotary frequencies), and the
        modules themselves stay (so adapters, hooks and optimizers keep theirs). A module that
        someone replaced (an adapter wrapping a linear) is left as it is.

        Raises:
            ConfigError: `new` needs tensors of other shapes than the model has (`hidden_size`,
                `num_labels` of a classifier, ...), or is not a valid config.
        """
        old = self._frozen_config
        if new == old:
            return
        spec = get_spec(self._architecture)
        state = self.state
        expected = expected_shapes(new, self._architecture)
        wrong = [
            f"{name}: {list(t.shape)} -> {list(expected[name][0])}"
            for name, t in state.tensors.items()
            if name in expected and tuple(t.shape) != expected[name][0]
        ]
        fresh = dict(skeleton(new, self._architecture).named_modules())
        # a tensor absent because its module was replaced (PEFT's LoRA layer keeps the weight as
        # `base_layer.weight`, a ModulesToSaveWrapper as `original_module.weight`) is not missing
        missing = sorted(n for n in set(expected) - set(state.tensors) if not _replaced(self._tree, fresh, n))
        if wrong or missing:
            raise ConfigError(
                f"{type(self).__name__}.config: this change needs tensors of other shapes "
                f"({'; '.join(wrong[:3]) or 'new tensors: ' + ', '.join(missing[:3])}); change the model "
                "with its transform instead (resize_token_embeddings, prune_heads, ...), or load it "
                "again with the new value (from_pretrained(..., num_labels=n, ignore_mismatched_sizes=True))"
            )
        if dict(spec.ties(new)) != self._ties:
            self._install(transforms.tie_weights(state.replace(config=new)))
            return
        for name, module in self._tree.named_modules():
            template = fresh.get(name)
            if template is None or type(template) is not plain_class(module):
                continue  # replaced by someone (an adapter): theirs to keep
            for key, value in _plain_attributes(template).items():
                module.__dict__[key] = value
            if module.__dict__.get("config") is old:
                module.__dict__["config"] = new
        buffers = dict(self.named_buffers(remove_duplicate=False))
        for name, tensor in spec.computed_buffers(new, None).items():
            if name in buffers:
                _set(self, name, tensor.to(device=buffers[name].device, dtype=buffers[name].dtype), parameter=False)
        object.__setattr__(self, "_frozen_config", new)

    # -- Transformers' per-family class attributes, derived from the spec ------------------------

    @property
    def _no_split_modules(self) -> list[str]:
        layers = next((m for m in self._tree.modules() if isinstance(m, nn.ModuleList)), None)
        return [] if layers is None or not len(layers) else [type(layers[0]).__name__]

    @property
    def _tied_weights_keys(self) -> list[str] | None:
        return sorted(self._ties) or None

    @property
    def accepts_loss_kwargs(self) -> bool:
        """Whether `forward` uses Trainer's `num_items_in_batch` (as Transformers' class: the
        causal LMs do, BERT's heads do not)."""
        return self._frozen_config.model_type != "bert"

    @property
    def loss_type(self) -> str | None:
        return _LOSS_TYPES.get(get_spec(self._architecture).output)

    @property
    def loss_function(self):
        """Transformers' loss function for this head (`transformers.loss.LOSS_MAPPING`'s contract),
        computed by `fmodel.losses`."""
        return _LOSS_FUNCTIONS[get_spec(self._architecture).output]

    # -- the state <-> module binding ---------------------------------------------------

    def _install(self, state: ModelState) -> None:
        """Make `state` this module's tree. Tensors that are already parameters here stay the
        same `nn.Parameter` objects (optimizers keep working for them); hooks registered on a
        submodule move to the submodule of the same name in the new tree. Parameters go in
        through `register_parameter`, so what patches it (accelerate's `init_empty_weights`)
        sees them."""
        with torch.device("meta"), _SkipInit():
            tree = build_module(state.config, state.architecture)
        old_modules = dict(self.named_modules()) if "_tree" in self.__dict__ else {}
        for name in list(self._modules):
            delattr(self, name)
        for name, child in tree.named_children():
            self.add_module(name, child)
        # One children dict for both: a module put on the model (PEFT wrapping `classifier` or
        # `lm_head` in a ModulesToSaveWrapper, `setattr(model, name, m)`) is what the tree runs.
        tree.__dict__["_modules"] = self._modules
        installed: dict[int, nn.Parameter] = {}
        for name, tensor in state.params.items():
            param = installed.get(id(tensor))
            if param is None:
                param = (
                    tensor
                    if isinstance(tensor, nn.Parameter)
                    else nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
                )
                _set(self, name, param, parameter=True)
                installed[id(tensor)] = _get(self, name)
            else:
                _set(self, name, param, parameter=True, register=False)
        for name, tensor in state.buffers.items():
            _set(self, name, tensor, parameter=False)
        for name, module in self.named_modules():
            old = old_modules.get(name)
            if old is not None and old is not self:
                _move_hooks(old, module)
        # plain attributes, not module state
        object.__setattr__(self, "_frozen_config", state.config)
        object.__setattr__(self, "_ties", dict(state.ties))
        object.__setattr__(self, "_attn_implementation", state.attn_implementation)
        object.__setattr__(self, "_architecture", state.architecture)
        # The skeleton root shares this module's children; forward runs it so hooks fire.
        object.__setattr__(self, "_tree", tree)
        bind_base_call(self, tree)
        tree.train(self.training)

    def _write_values(self, new: ModelState) -> None:
        """Copy `new`'s values into this model's parameters in place (same names, shapes and ties
        as now): for transforms that only redraw values, so parameters keep their identity."""
        params = dict(self.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for name, tensor in new.params.items():
                if name not in self._ties and tensor is not params[name]:
                    params[name].copy_(tensor)

    @property
    def state(self) -> ModelState:
        """The current model as an immutable `ModelState` sharing this module's tensors.

        A declared tie whose two parameters are no longer one tensor (a `functional_call` with
        `tie_weights=False`, or a loader that replaced one side) is left out: the state then
        runs untied, as the module does; `tie_weights()` ties it again to the source."""
        params = dict(self.named_parameters(remove_duplicate=False))
        buffers = dict(self.named_buffers(remove_duplicate=False))
        ties = {a: s for a, s in self._ties.items() if params.get(a) is params.get(s)}
        return ModelState(self._frozen_config, self._architecture, params, buffers, ties, self._attn_implementation)

    def _apply_transform(self, transform, *args: Any, **kwargs: Any) -> ModelState:
        new = transform(self.state, *args, **kwargs)
        self._install(new)
        return new

    def _call_info(self) -> _CallInfo:
        """What `prepare_call` reads of a state, without building one (cheap, and traceable by
        torch.compile: no attrs converters in the way)."""
        param = next((p for p in self.parameters() if p.is_floating_point()), None)
        return _CallInfo(
            self._frozen_config,
            self._architecture,
            self._attn_implementation,
            torch.float32 if param is None else param.dtype,
            torch.device("cpu") if param is None else param.device,
        )

    # -- forward -----------------------------------------------------------------------

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
        """
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
        if getattr(module, "supports_cache", False):
            if use_cache and past_key_values is None:
                batch, length = _batch_and_length(input_ids, inputs_embeds)
                ref = input_ids if input_ids is not None else inputs_embeds  # offloaded weights: on meta
                past_key_values = init_cache(self._call_info(), batch, max(length, 1), device=ref.device)
            if past_key_values is not None:
                past_key_values = _with_room(past_key_values, _batch_and_length(input_ids, inputs_embeds)[1])
                kwargs["past_key_values"] = past_key_values
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
        if runner is None:
            runner = module
        out = to_output(runner(*args, **tree_kwargs))
        fields = {k: getattr(out, k) for k in _OUTPUT_FIELDS[head]}
        if labels is not None and out.logits is not None:
            fields["loss"] = self._loss(head, out.logits, labels, num_items_in_batch, kwargs)
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

    # -- small API surface ----------------------------------------------------------------

    @property
    def framework(self) -> str:
        return "pt"

    @property
    def dummy_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.tensor([[7, 6, 0, 0, 1], [1, 2, 3, 0, 0], [0, 0, 0, 4, 5]])}

    def warn_if_padding_and_no_attention_mask(self, input_ids: torch.Tensor, attention_mask) -> None:
        """Warn once when `input_ids` start or end with the pad token and no mask was given."""
        pad = self.config.pad_token_id
        if attention_mask is not None or pad is None or self.__dict__.get("_warned_padding"):
            return
        if (input_ids[:, [-1, 0]] == pad).any():
            from ..io.load import logger

            logger.warning(
                "We strongly recommend passing in an `attention_mask` since your input_ids may be padded."
            )
            self.__dict__["_warned_padding"] = True

    # -- outputs, module lookup ----------------------------------------------------------------

    @property
    def can_record_outputs(self) -> dict[str, type]:
        """Which module classes produce what the forward can return, as Transformers'
        `_can_record_outputs`: `hidden_states` from each layer, `attentions` from each attention."""
        layers = next(m for m in self.modules() if isinstance(m, nn.ModuleList))
        attention_cls = next(type(m) for m in layers.modules() if hasattr(m, "num_key_value_groups"))
        return {"hidden_states": type(layers[0]), "attentions": attention_cls}

    def retrieve_modules_from_names(
        self, names: list[str], add_prefix: bool = False, remove_prefix: bool = False
    ) -> list[nn.Module]:
        """The modules owning the tensors `names` (Transformers' semantics, prefix handling included)."""
        module_keys = {".".join(key.split(".")[:-1]) for key in names}
        module_keys |= {".".join(key.split(".")[:-2]) for key in names if key and key[-1].isdigit()}
        prefix = self.base_model_prefix
        found = []
        for name, module in self.named_modules():
            if remove_prefix:
                name = name.removeprefix(f"{prefix}.")
            elif add_prefix:
                name = f"{prefix}.{name}" if name else prefix
            if name in module_keys:
                found.append(module)
        return found

    def can_generate(self) -> bool:
        return get_spec(self._architecture).output == "causal_lm"

    @property
    def base_model(self) -> nn.Module:
        spec = get_spec(self._architecture)
        return self if spec.is_base else getattr(self, spec.prefix)


def _set(root: nn.Module, dotted: str, value: torch.Tensor, *, parameter: bool, register: bool = True) -> None:
    owner_name, _, leaf = dotted.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    if parameter:
        if register:
            owner._parameters.pop(leaf, None)
            owner.register_parameter(leaf, value)  # what init_empty_weights patches
        else:  # a tied alias: the very Parameter its source got
            owner._parameters[leaf] = value
    else:
        owner._buffers[leaf] = value


def _replaced(tree: nn.Module, fresh: dict[str, nn.Module], tensor_name: str) -> bool:
    """Whether the module owning `tensor_name` in `tree` is no longer the skeleton's (`fresh`)
    module class: someone (an adapter library) replaced it, and its tensors are its own."""
    owner = tensor_name.rpartition(".")[0]
    try:
        module = tree.get_submodule(owner)
    except AttributeError:
        return False
    template = fresh.get(owner)
    return template is not None and type(template) is not plain_class(module)


def _new_instance(cls: type, *args: Any) -> Any:
    return cls.__new__(cls, *args)


def _get(root: nn.Module, dotted: str) -> nn.Parameter:
    owner_name, _, leaf = dotted.rpartition(".")
    return (root.get_submodule(owner_name) if owner_name else root)._parameters[leaf]


class _CallInfo:
    """The part of a `ModelState` that `fmodel.forward.prepare_call` reads."""

    __slots__ = ("architecture", "attn_implementation", "config", "device", "dtype")

    def __init__(self, config, architecture: str, attn_implementation: str, dtype, device) -> None:
        self.config = config
        self.architecture = architecture
        self.attn_implementation = attn_implementation
        self.dtype = dtype
        self.device = device


def _plain_attributes(module: nn.Module) -> dict[str, Any]:
    """A module's own settings (numbers, strings, tuples), which a config decides at build time
    (not `training`: the train/eval mode is the model's, not the config's)."""
    return {
        k: v
        for k, v in vars(module).items()
        if k not in ("config", "training")
        and not k.startswith("_")
        and isinstance(v, (bool, int, float, str, tuple, type(None)))
    }


def _batch_and_length(input_ids, inputs_embeds) -> tuple[int, int]:
    ref = input_ids if input_ids is not None else inputs_embeds
    return ref.shape[0], ref.shape[1]


def _with_room(cache: KVCache, new_tokens: int) -> KVCache:
    """`cache`, or a copy with larger buffers when `new_tokens` more would not fit (the facade's
    caches grow as Transformers' DynamicCache does; fmodel.forward's are fixed-size)."""
    if not isinstance(cache, KVCache):
        raise TypeError(
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


def _causal_lm_loss(logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100, shift_labels=None, **kwargs):
    return losses.causal_lm_loss(
        logits, labels, num_items_in_batch=num_items_in_batch, ignore_index=ignore_index, shift_labels=shift_labels
    )


def _masked_lm_loss(logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100, **kwargs):
    return losses.masked_lm_loss(logits, labels, num_items_in_batch=num_items_in_batch, ignore_index=ignore_index)


def _sequence_classification_loss(labels, pooled_logits, config, **kwargs):
    num_labels = config.num_labels
    if config.problem_type is None:
        config.problem_type = losses.sequence_classification_problem(num_labels, labels)
    return losses.sequence_classification_loss(
        pooled_logits, labels, num_labels=num_labels, problem_type=config.problem_type, **kwargs
    )


_LOSS_TYPES = {"causal_lm": "ForCausalLM", "masked_lm": "ForMaskedLM", "sequence_classification": "ForSequenceClassification"}
_LOSS_FUNCTIONS = {
    "causal_lm": _causal_lm_loss,
    "masked_lm": _masked_lm_loss,
    "sequence_classification": _sequence_classification_loss,
    "base": _causal_lm_loss,  # Transformers' fallback for a class without a loss type
}


# The fields of Transformers' output class for each head (CausalLMOutputWithPast, ...), in order.
_OUTPUT_FIELDS = {
    "causal_lm": ("logits", "past_key_values", "hidden_states", "attentions"),
    "masked_lm": ("logits", "hidden_states", "attentions"),
    "sequence_classification": ("logits", "hidden_states", "attentions"),
    "base": ("last_hidden_state", "pooler_output", "past_key_values", "hidden_states", "attentions"),
}


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def _move_hooks(old: nn.Module, new: nn.Module) -> None:
    """Give `new` the hook dicts of `old` (the same dict objects, so existing handles still
    remove them), plus attributes hooks recorded on it (e.g. memory-hook counters)."""
    for attr in _HOOK_DICTS:
        hooks = getattr(old, attr, None)
        if hooks:
            setattr(new, attr, hooks)
    for attr in ("mem_rss_pre_forward", "mem_rss_post_forward", "mem_rss_diff"):
        if attr in old.__dict__:
            new.__dict__[attr] = old.__dict__[attr]
