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

import os
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .. import attention, stats, transforms
from ..attention import legacy_masks as masks
from ..errors import AttentionUnavailableError, QuantizedDtypeError
from ..forward import forward as functional_forward
from ..forward import prepare_call, to_output
from ..io import load_with_report
from ..io.legacy_keys import modern_key
from ..io.load import default_architecture, logger
from ..models import get_spec
from ..models.skeleton import _SkipInit, build_module
from ..state import ModelState
from .generation import GenerationMixin
from .hub import HubMixin
from .outputs import ModelOutput

__all__ = ["PreTrainedModel"]


class PreTrainedModel(HubMixin, GenerationMixin, nn.Module):
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

    @classmethod
    def _architecture_for(cls, config) -> str:
        return cls.architecture or default_architecture(config)

    @classmethod
    def from_state(cls, state: ModelState) -> PreTrainedModel:
        """Wrap a state (its tensors become this model's parameters, shared, not copied)."""
        return cls(state.config, state=state)

    @classmethod
    def _from_config(cls, config, **kwargs: Any) -> PreTrainedModel:
        return cls(config)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        config=None,
        cache_dir: str | os.PathLike | None = None,
        torch_dtype: Any = None,
        dtype: Any = None,
        device_map: Any = None,
        revision: str | None = None,
        local_files_only: bool | None = None,
        attn_implementation: str | None = None,
        output_loading_info: bool = False,
        ignore_mismatched_sizes: bool = False,
        **kwargs: Any,
    ):
        """Load a checkpoint (folder or hub id) like Transformers' `from_pretrained`; eval mode.

        `dtype` (or the older `torch_dtype`): None keeps the stored dtype, "auto" too;
        `device_map`: None, "cpu", "auto" (the first GPU if any, else CPU) or a device.
        Missing tensors are initialised and reported, as Transformers does.
        """
        from ..io.load import logger

        per_module = device_map if isinstance(device_map, dict) else None
        device = None if per_module is not None else _device_from_map(device_map)
        state, report = load_with_report(
            pretrained_model_name_or_path,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            dtype=dtype if dtype is not None else torch_dtype,
            device=device,
            architecture=cls._architecture_for_checkpoint(config),
            attn_implementation=attn_implementation or "sdpa",
            allow_missing=True,
            strict=False,
            ignore_mismatched_sizes=ignore_mismatched_sizes,
            config=config,
            gguf_file=kwargs.pop("gguf_file", None),
            variant=kwargs.pop("variant", None),
        )
        if report.unexpected:
            logger.warning("Some weights of the checkpoint were not used: %s", list(report.unexpected))
        if per_module is not None:
            state = transforms.place(state, per_module)
        model = cls.from_state(state)
        if per_module is not None:
            model._add_device_hooks(per_module)
        generation = _saved_generation_config(
            pretrained_model_name_or_path, revision, cache_dir, local_files_only
        )
        if generation is not None:
            model.__dict__["_generation_config_dict"] = generation
        if output_loading_info:
            info = {
                "missing_keys": list(report.missing),
                "unexpected_keys": list(report.unexpected),
                "mismatched_keys": [m[0] for m in report.mismatched],
                "error_msgs": [],
            }
            return model, info
        return model

    @classmethod
    def _architecture_for_checkpoint(cls, config) -> str | None:
        return cls.architecture

    def post_init(self) -> None:
        """Kept for API compatibility: weights are initialised by `fmodel.init` at construction."""

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

    # -- methods that delegate to pure transforms ---------------------------------------

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

    def set_attn_implementation(self, attn_implementation: str | dict[str, str]) -> None:
        """Switch every attention layer at once (a dict maps sub-model names to names; the
        families here have one model, so its single value, or the "" entry, is used)."""
        name = attn_implementation
        if isinstance(name, dict):
            values = set(name.values())
            if "" not in name and len(values) != 1:
                raise ValueError(
                    f"set_attn_implementation: expected one implementation for this model, got {name}"
                )
            name = name.get("", next(iter(values)))
        self._apply_transform(transforms.set_attn_implementation, name)

    def get_correct_attn_implementation(self, requested: str | None, is_init_check: bool = False) -> str:
        """`requested` (default "sdpa") when it can run here; otherwise raises saying why."""
        name = requested or "sdpa"
        attention.get(name)
        return name

    def _can_set_attn_implementation(self) -> bool:
        return True

    def _check_can_dispatch(self, name: str) -> bool:
        attention.get(name)  # raises AttentionUnavailableError with the reason
        return True

    def _sdpa_can_dispatch(self, is_init_check: bool = False) -> bool:
        return self._check_can_dispatch("sdpa")

    def _flash_attn_2_can_dispatch(self, is_init_check: bool = False) -> bool:
        return self._check_can_dispatch("flash_attention_2")

    def _flash_attn_3_can_dispatch(self, is_init_check: bool = False) -> bool:
        return self._check_can_dispatch("flash_attention_3")

    def _flex_attn_can_dispatch(self, is_init_check: bool = False) -> bool:
        return self._check_can_dispatch("flex_attention")

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

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        return stats.num_parameters(
            self.state, only_trainable=only_trainable, exclude_embeddings=exclude_embeddings
        )

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        return stats.get_memory_footprint(self.state, return_buffers=return_buffers)

    def estimate_tokens(self, input_dict: dict[str, Any]) -> int:
        return stats.estimate_tokens(input_dict)

    def floating_point_ops(self, input_dict: dict[str, Any], exclude_embeddings: bool = True) -> int:
        return stats.floating_point_ops(self.state, input_dict, exclude_embeddings=exclude_embeddings)

    def train(self, mode: bool = True) -> PreTrainedModel:
        super().train(mode)
        tree = self.__dict__.get("_tree")
        if tree is not None:
            tree.train(mode)
        return self

    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(self.__dict__.get("_gradient_checkpointing", False))

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each layer's activations in the backward pass (training mode only).

        Always non-reentrant: Transformers' reentrant default gives no gradients when the
        embeddings are frozen; `use_reentrant=True` in the kwargs is therefore refused."""
        if (gradient_checkpointing_kwargs or {}).get("use_reentrant"):
            raise ValueError(
                "fmodel checkpoints non-reentrantly only (reentrant loses gradients with frozen inputs)"
            )
        self.__dict__["_gradient_checkpointing"] = True

    def gradient_checkpointing_disable(self) -> None:
        self.__dict__["_gradient_checkpointing"] = False

    def enable_input_require_grads(self) -> None:
        """Make the input embeddings' output require grad (for adapters on a frozen base with
        gradient checkpointing), through a forward hook as Transformers does."""

        def hook(module, inputs, output):
            output.requires_grad_(True)

        self.__dict__["_require_grads_hook"] = self.get_input_embeddings().register_forward_hook(hook)

    def disable_input_require_grads(self) -> None:
        handle = self.__dict__.pop("_require_grads_hook", None)
        if handle is not None:
            handle.remove()

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

    # -- dtype casts: refused for a quantized model (fmodel.to's rule); device moves are fine --

    def _refuse_quantized_cast(self, call: str) -> None:
        if transforms.is_quantized(self.state):
            raise QuantizedDtypeError(
                f"{call}: cannot cast a quantized model to another dtype (its integer weights and "
                "scales only mean something as they are); move it with .to(device), or call "
                ".dequantize() first"
            )

    def half(self) -> PreTrainedModel:
        self._refuse_quantized_cast("half()")
        return super().half()

    def float(self) -> PreTrainedModel:
        self._refuse_quantized_cast("float()")
        return super().float()

    def bfloat16(self) -> PreTrainedModel:
        self._refuse_quantized_cast("bfloat16()")
        return super().bfloat16()

    def double(self) -> PreTrainedModel:
        self._refuse_quantized_cast("double()")
        return super().double()

    def to(self, *args: Any, **kwargs: Any) -> PreTrainedModel:
        """`nn.Module.to`; a dtype argument on a quantized model raises `QuantizedDtypeError`."""
        dtype = torch._C._nn._parse_to(*args, **kwargs)[1]
        if dtype is not None:
            self._refuse_quantized_cast(f"to({dtype})")
        return super().to(*args, **kwargs)

    @staticmethod
    def _fix_state_dict_key_on_load(key: str) -> tuple[str, bool]:
        return modern_key(key)

    @staticmethod
    def _fix_state_dict_key_on_save(key: str) -> tuple[str, bool]:
        return key, False

    def _fix_state_dict_keys_on_save(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return {self._fix_state_dict_key_on_save(key)[0]: value for key, value in state_dict.items()}

    @classmethod
    def _load_pretrained_model(
        cls,
        model: PreTrainedModel,
        state_dict: dict[str, torch.Tensor] | None,
        checkpoint_files: list[str] | None,
        pretrained_model_name_or_path: str | None = None,
        ignore_mismatched_sizes: bool = False,
        sharded_metadata: dict | None = None,
        device_map: Any = None,
        disk_offload_folder: str | None = None,
        dtype: torch.dtype | None = None,
        hf_quantizer: Any = None,
        keep_in_fp32_regex: Any = None,
        device_mesh: Any = None,
        key_mapping: dict[str, str] | None = None,
        weights_only: bool = True,
    ):
        """Load `state_dict` (or the tensors of `checkpoint_files`) into `model`, Transformers'
        way: legacy names fixed, `key_mapping` regexes applied, prefixes added/stripped,
        missing tensors initialised. Returns (model, missing_keys, unexpected_keys,
        mismatched_keys, disk_offload_index, error_msgs)."""
        import re

        from ..io.load import state_from_tensors
        from ..io.read import read_weight_file

        if hf_quantizer is not None or device_mesh is not None:
            raise ValueError("_load_pretrained_model: hf_quantizer and device_mesh are Transformers-only")
        if state_dict is None:
            state_dict = {}
            for path in checkpoint_files or ():
                state_dict.update(read_weight_file(path))
        tensors = {}
        for key, tensor in state_dict.items():
            for pattern, replacement in (key_mapping or {}).items():
                key = re.sub(pattern, replacement, key)
            tensors[cls._fix_state_dict_key_on_load(key)[0]] = tensor
        state, report = state_from_tensors(
            model.config,
            tensors,
            architecture=model._architecture,
            source=str(pretrained_model_name_or_path or "state_dict"),
            dtype=dtype,
            attn_implementation=model._attn_implementation,
            allow_missing=True,
            strict=False,
            ignore_mismatched_sizes=ignore_mismatched_sizes,
        )
        model._install(state)
        if isinstance(device_map, dict):
            model._install(transforms.place(model.state, device_map))
            model._add_device_hooks(device_map)
        mismatched = [m[0] for m in report.mismatched]
        return model, list(report.missing), list(report.unexpected), mismatched, None, []

    # -- devices ---------------------------------------------------------------------------

    def _add_device_hooks(self, device_map: dict[str, Any]) -> None:
        """Move each mapped module's tensor inputs to its device before it runs (what
        accelerate's dispatch hooks do), so a model split across devices runs as one."""
        for name, dev in device_map.items():
            if dev == "disk":
                continue
            module = self.get_submodule(name) if name else self
            target = torch.device(dev)

            def to_device(mod, args, kwargs, target=target):
                move = lambda x: x.to(target) if isinstance(x, torch.Tensor) else x  # noqa: E731
                return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}

            module.register_forward_pre_hook(to_device, with_kwargs=True)

    # -- memory hooks (Transformers' ModuleUtilsMixin) ---------------------------------------

    @staticmethod
    def _hook_rss_memory_pre_forward(module: nn.Module, *args: Any, **kwargs: Any) -> None:
        module.mem_rss_pre_forward = stats.current_rss()

    @staticmethod
    def _hook_rss_memory_post_forward(module: nn.Module, *args: Any, **kwargs: Any) -> None:
        module.mem_rss_post_forward = stats.current_rss()
        diff = module.mem_rss_post_forward - module.mem_rss_pre_forward
        module.mem_rss_diff = diff + getattr(module, "mem_rss_diff", 0)

    def add_memory_hooks(self) -> None:
        """Record each module's resident-memory increase over its forward in `mem_rss_diff`
        (bytes, accumulated; `reset_memory_hooks_state` zeroes it)."""
        for module in self.modules():
            module.register_forward_pre_hook(self._hook_rss_memory_pre_forward)
            module.register_forward_hook(self._hook_rss_memory_post_forward)
        self.reset_memory_hooks_state()

    def reset_memory_hooks_state(self) -> None:
        for module in self.modules():
            module.mem_rss_diff = 0
            module.mem_rss_post_forward = 0
            module.mem_rss_pre_forward = 0

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

    # -- faster paths: bettertransformer, kernels, compiled calls --------------------------

    def to_bettertransformer(self) -> PreTrainedModel:
        """Switch to torch's fused attention (sdpa), which is what BetterTransformer provided;
        `reverse_bettertransformer` restores the previous implementation."""
        if "_pre_bettertransformer" in self.__dict__:
            raise ValueError("to_bettertransformer: the model is already using BetterTransformer (sdpa)")
        previous = self._attn_implementation
        self.set_attn_implementation("sdpa")
        self.__dict__["_pre_bettertransformer"] = previous
        return self

    def reverse_bettertransformer(self) -> PreTrainedModel:
        if "_pre_bettertransformer" not in self.__dict__:
            raise ValueError("reverse_bettertransformer: to_bettertransformer was not called on this model")
        self.set_attn_implementation(self.__dict__.pop("_pre_bettertransformer"))
        return self

    def kernelize(self) -> None:
        """Use the fastest attention kernel that runs here (flash-attention 3, then 2, on CUDA
        with the package installed; else sdpa). Warns when that is what the model already uses."""
        best = next(n for n in _KERNEL_PREFERENCE if _runs_here(n))
        if best == self._attn_implementation:
            logger.warning("kernelize: no faster kernel than %r is available here; nothing changed", best)
        else:
            self.__dict__.setdefault("_pre_kernelize", self._attn_implementation)
            self.set_attn_implementation(best)
        self.__dict__["_use_kernels"] = True

    @property
    def use_kernels(self) -> bool:
        return bool(self.__dict__.get("_use_kernels", False))

    @use_kernels.setter
    def use_kernels(self, value: bool) -> None:
        if value:
            if not self.use_kernels:
                self.kernelize()
            return
        previous = self.__dict__.pop("_pre_kernelize", None)
        if previous is not None:
            self.set_attn_implementation(previous)
        self.__dict__["_use_kernels"] = False

    def get_compiled_call(self, compile_config: Any = None):
        """`self.__call__` with the module tree run through `torch.compile(**compile_config)`
        (inputs, masks and outputs are handled outside the compiled region); cached until the
        config or the model's shapes change.
        `compile_config`: None, a dict of `torch.compile` arguments, or an object with `to_dict()`
        (Transformers' `CompileConfig`)."""
        options = _compile_options(compile_config)
        key = (id(self._tree), options)
        cached = self.__dict__.get("_compiled_call")
        if cached is None or cached[0] != key:
            compiled_tree = torch.compile(self._tree, **options)

            def compiled_call(*args: Any, **kwargs: Any):
                self.__dict__["_runner"] = compiled_tree
                try:
                    return self(*args, **kwargs)
                finally:
                    self.__dict__.pop("_runner", None)

            cached = (key, compiled_call)
            self.__dict__["_compiled_call"] = cached
        return cached[1]

    # -- Transformers' legacy mask helpers (pure functions in attention/legacy_masks.py) -------------

    def invert_attention_mask(self, encoder_attention_mask: torch.Tensor) -> torch.Tensor:
        return masks.invert_attention_mask(encoder_attention_mask, self.dtype)

    @staticmethod
    def create_extended_attention_mask_for_decoder(input_shape, attention_mask, device=None) -> torch.Tensor:
        return masks.create_extended_attention_mask_for_decoder(tuple(input_shape), attention_mask, device)

    def get_extended_attention_mask(
        self, attention_mask, input_shape, device=None, dtype=None
    ) -> torch.Tensor:
        is_decoder = bool(self.config.extra.get("is_decoder", False))
        return masks.get_extended_attention_mask(
            attention_mask, tuple(input_shape), is_decoder=is_decoder, dtype=dtype or self.dtype
        )

    def get_head_mask(self, head_mask, num_hidden_layers: int, is_attention_chunked: bool = False):
        return masks.get_head_mask(head_mask, num_hidden_layers, self.dtype, is_attention_chunked)

    def _convert_head_mask_to_5d(self, head_mask: torch.Tensor, num_hidden_layers: int) -> torch.Tensor:
        return masks.convert_head_mask_to_5d(head_mask, num_hidden_layers, self.dtype)

    def can_generate(self) -> bool:
        return get_spec(self._architecture).output == "causal_lm"

    @property
    def device(self) -> torch.device:
        return self.state.device

    @property
    def dtype(self) -> torch.dtype:
        return self.state.dtype

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


def _saved_generation_config(path, revision, cache_dir, local_files_only) -> dict | None:
    """The checkpoint's generation_config.json as written (None when it has none)."""
    from ..generation_config import GENERATION_CONFIG_NAME, _find, _read_json

    path = os.fspath(path)
    if path.endswith(".gguf"):
        return None
    found = _find(path, GENERATION_CONFIG_NAME, revision, cache_dir, local_files_only)
    return None if found is None else _read_json(found)


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


def _device_from_map(device_map: Any) -> torch.device | None:
    if device_map is None:
        return None
    if device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        return torch.device("cuda") if torch.cuda.is_available() else None
    if isinstance(device_map, (str, int, torch.device)):
        return torch.device(device_map)
    raise ValueError(
        f"device_map {device_map!r}: expected None, 'auto', a device, or a dict of module name -> device"
    )


def _runs_here(name: str) -> bool:
    try:
        attention.get(name)
    except AttentionUnavailableError:
        return False
    return True


_KERNEL_PREFERENCE = ("flash_attention_3", "flash_attention_2", "sdpa")
_COMPILE_KEYS = ("fullgraph", "dynamic", "backend", "mode", "options")


def _compile_options(compile_config: Any) -> dict[str, Any]:
    if compile_config is None:
        return {}
    if hasattr(compile_config, "to_dict"):
        compile_config = compile_config.to_dict()
    return {k: v for k, v in dict(compile_config).items() if k in _COMPILE_KEYS}


def _loss(kind: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if kind == "causal_lm":  # predict token t+1 from position t; -100 is ignored
        logits, labels = logits[:, :-1], labels[:, 1:]
    if kind == "sequence_classification" and logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100
    )
