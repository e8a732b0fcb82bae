"""`PreTrainedModel`: the stateful, Transformers-compatible facade over a `ModelState`.

The module tree is the family's skeleton with the state's own tensors installed as
`nn.Parameter`s (same storage, Transformers' names), so `parameters()`, `state_dict()`,
`torch.optim` and `loss.backward()` work as users expect. `forward` (forward_call.py) runs that
tree with its own parameters, so hooks, adapters and `torch.func.functional_call` act as on any
module; `model.state` is rebuilt from the current parameters on each read, so an optimizer's
in-place update shows in it at once (the state shares those tensors; take
`fmodel.to(model.state, ...)` or a clone to freeze a copy). Methods that change the model call a
pure transform and install its result. The class is assembled from one mixin per concern
(config binding, forward, loading, saving and hub, surgery, attention choice, counting,
devices, training switches, legacy mask helpers, generation); with Transformers installed,
instances are also `transformers.PreTrainedModel`s (interop.py says why).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .. import transforms
from ..errors import ArgumentTypeError
from ..models import get_spec
from ..models.skeleton import _SkipInit, build_module
from ..state import ModelState
from .arg_checks import check_config_argument
from .attention_choice import AttentionMixin
from .base_call import bind_base_call
from .config_binding import ConfigBindingMixin
from .config_view import ConfigView, as_fmodel_config, view_class
from .counting import CountingMixin
from .devices import DeviceMixin, empty_state, registers_on_meta
from .forward_call import ForwardMixin
from .generation import GenerationMixin
from .hub import HubMixin
from .interop import interop_class
from .loading import LoadingMixin
from .mask_helpers import MaskHelpersMixin
from .module_tree import get_param, move_hooks, set_tensor
from .surgery import SurgeryMixin
from .tensor_parallel import TensorParallelMixin, as_parameter, keep_tensor_parallel
from .training import TrainingMixin

__all__ = ["PreTrainedModel"]


class PreTrainedModel(
    ConfigBindingMixin,
    ForwardMixin,
    LoadingMixin,
    HubMixin,
    SurgeryMixin,
    AttentionMixin,
    CountingMixin,
    DeviceMixin,
    TrainingMixin,
    TensorParallelMixin,
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
        fresh = state is None
        if inputs:
            raise ArgumentTypeError(
                f"{type(self).__name__}() takes one config, got {len(inputs)} more arguments"
            )
        if state is None:
            if config is None:
                raise ArgumentTypeError(f"{type(self).__name__}(config) needs a config (or state=), got None")
            if not isinstance(config, dict):
                check_config_argument(config, type(self).__name__)
            frozen = as_fmodel_config(config)
            if registers_on_meta():  # accelerate's init_empty_weights: no values to draw
                state = empty_state(frozen, self._architecture_for(frozen))
            else:
                state = transforms.init(
                    frozen,
                    architecture=self._architecture_for(frozen),
                    dtype=torch.get_default_dtype(),  # as Transformers' constructors
                    draw_order="transformers",
                )
        runtime = dict(config._runtime) if isinstance(config, ConfigView) else {}
        self.__dict__["_config_view"] = view_class(state.config)(self, **runtime)
        self.__dict__["warnings_issued"] = {}
        self._install(state)
        self.train(fresh)  # as Transformers: a new model trains, a loaded one (from_state) evaluates

    # -- Transformers' per-family class attributes, derived from the spec ------------------------

    @property
    def _no_split_modules(self) -> list[str]:
        layers = next((m for m in self._tree.modules() if isinstance(m, nn.ModuleList)), None)
        return [] if layers is None or not len(layers) else [type(layers[0]).__name__]

    @property
    def _tied_weights_keys(self) -> list[str] | None:
        return sorted(self._ties) or None

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
                param = as_parameter(tensor)
                set_tensor(self, name, param, parameter=True)
                installed[id(tensor)] = get_param(self, name)
            else:
                set_tensor(self, name, param, parameter=True, register=False)
        for name, tensor in state.buffers.items():
            set_tensor(self, name, tensor, parameter=False)
        for name, module in self.named_modules():
            old = old_modules.get(name)
            if old is not None and old is not self:
                move_hooks(old, module)
        # plain attributes, not module state
        object.__setattr__(self, "_frozen_config", state.config)
        object.__setattr__(self, "_ties", dict(state.ties))
        object.__setattr__(self, "_attn_implementation", state.attn_implementation)
        object.__setattr__(self, "_architecture", state.architecture)
        # a tensor-parallel state (fmodel.distribute, from_pretrained(tp_plan=...)): its mesh, and
        # the plan it was split by, on the parameters made here (forward_call.py runs it)
        object.__setattr__(self, "_tp_mesh", keep_tensor_parallel(state, self))
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
        return ModelState(
            self._frozen_config, self._architecture, params, buffers, ties, self._attn_implementation
        )

    def _apply_transform(self, transform, *args: Any, **kwargs: Any) -> ModelState:
        new = transform(self.state, *args, **kwargs)
        self._install(new)
        return new

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
        return get_spec(self._architecture).output in ("causal_lm", "seq2seq_lm")

    @property
    def base_model(self) -> nn.Module:
        spec = get_spec(self._architecture)
        return self if spec.is_base else getattr(self, spec.prefix)


def _new_instance(cls: type, *args: Any) -> Any:
    return cls.__new__(cls, *args)
