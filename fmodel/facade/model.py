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
import torch.nn.functional as F
from torch import nn

from .. import transforms
from ..forward import forward as functional_forward
from ..forward import prepare_call, to_output
from ..models import get_spec
from ..models.skeleton import _SkipInit, build_module
from ..state import ModelState
from .attention_choice import AttentionMixin
from .counting import CountingMixin
from .devices import DeviceMixin
from .generation import GenerationMixin
from .hub import HubMixin
from .loading import LoadingMixin
from .mask_helpers import MaskHelpersMixin
from .outputs import ModelOutput
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

    def __init__(self, config, *, state: ModelState | None = None) -> None:
        super().__init__()
        if state is None:
            state = transforms.init(config, architecture=self._architecture_for(config))
        self._install(state)
        self.eval()

    # -- construction ------------------------------------------------------------------

    # -- the state <-> module binding ---------------------------------------------------

    def _install(self, state: ModelState) -> None:
        """Make `state` this module's tree. Tensors that are already parameters here stay the
        same `nn.Parameter` objects (optimizers keep working for them); hooks registered on a
        submodule move to the submodule of the same name in the new tree."""
        with torch.device("meta"), _SkipInit():
            tree = build_module(state.config, state.architecture)
        old_modules = dict(self.named_modules()) if "_tree" in self.__dict__ else {}
        for name in list(self._modules):
            delattr(self, name)
        for name, child in tree.named_children():
            self.add_module(name, child)
        installed: dict[int, nn.Parameter] = {}
        for name, tensor in state.params.items():
            param = installed.get(id(tensor))
            if param is None:
                param = (
                    tensor
                    if isinstance(tensor, nn.Parameter)
                    else nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
                )
                installed[id(tensor)] = param
            _set(self, name, param, parameter=True)
        for name, tensor in state.buffers.items():
            _set(self, name, tensor, parameter=False)
        for name, module in self.named_modules():
            old = old_modules.get(name)
            if old is not None and old is not self:
                _move_hooks(old, module)
        # plain attributes, not module state
        object.__setattr__(self, "config", state.config)
        object.__setattr__(self, "_ties", dict(state.ties))
        object.__setattr__(self, "_attn_implementation", state.attn_implementation)
        object.__setattr__(self, "_architecture", state.architecture)
        # The skeleton root shares this module's children; forward runs it so hooks fire.
        object.__setattr__(self, "_tree", tree)
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
        """The current model as an immutable `ModelState` sharing this module's tensors."""
        params = dict(self.named_parameters(remove_duplicate=False))
        buffers = dict(self.named_buffers(remove_duplicate=False))
        return ModelState(
            self.config, self._architecture, params, buffers, self._ties, self._attn_implementation
        )

    def _apply_transform(self, transform, *args: Any, **kwargs: Any) -> ModelState:
        new = transform(self.state, *args, **kwargs)
        self._install(new)
        return new

    # -- forward -----------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = True,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ):
        """Transformers-shaped forward: `.logits` / `.last_hidden_state`, `.loss` with `labels`."""
        kwargs.pop("use_cache", None)
        call = dict(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_hidden_states=bool(output_hidden_states),
            output_attentions=bool(output_attentions),
            logits_to_keep=logits_to_keep,
            training=self.training,
            module=self._tree,
            gradient_checkpointing=self.is_gradient_checkpointing and self.training,
            **kwargs,
        )
        runner = self.__dict__.get("_runner")
        if runner is None:
            out = functional_forward(self.state, input_ids, **call)
        else:  # a compiled tree (get_compiled_call): it holds this model's parameters itself
            _, args, tree_kwargs = prepare_call(self.state, input_ids, **call)
            out = to_output(runner(*args, **tree_kwargs))
        kind = get_spec(self._architecture).output
        fields = {"loss": None}
        fields.update({k: getattr(out, k) for k in _OUTPUT_FIELDS[kind]})
        if labels is not None and out.logits is not None:
            labels = labels.to(out.logits.device)
            fields["loss"] = _loss(kind, out.logits, labels)
        result = ModelOutput((k, v) for k, v in fields.items() if v is not None)
        return result if return_dict or return_dict is None else result.to_tuple()

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


def _set(root: nn.Module, dotted: str, value: torch.Tensor, *, parameter: bool) -> None:
    owner_name, _, leaf = dotted.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    if parameter:
        owner._parameters[leaf] = value
    else:
        owner._buffers[leaf] = value


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


def _loss(kind: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if kind == "causal_lm":  # predict token t+1 from position t; -100 is ignored
        logits, labels = logits[:, :-1], labels[:, 1:]
    if kind == "sequence_classification" and logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100
    )
