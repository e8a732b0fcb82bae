"""`LoadingMixin`: the facade's constructors: `from_pretrained`, `_from_config`, `from_state` and
Transformers' `_load_pretrained_model`, each a pure load (`fmodel.io`) whose result is installed."""

from __future__ import annotations

import os
import re
from importlib.util import find_spec
from typing import TYPE_CHECKING, Any

import torch

from .. import attention, transforms
from .._checks import check_device, check_float_dtype
from ..config import load_config
from ..errors import ArgumentTypeError, InvalidArgumentError
from ..io import load_with_report
from ..io.legacy_keys import modern_key
from ..io.load import default_architecture, logger, state_from_tensors
from ..io.read import read_weight_file
from ..io.resolve import resolve_checkpoint
from ..state import ModelState
from .adapters import adapter_source, with_adapter
from .arg_checks import DeviceArgumentError, check_pretrained_path
from .config_view import ConfigView, DetachedConfig, as_fmodel_config
from .devices import DEVICE_MAP_STRATEGIES, registers_on_meta
from .tensor_parallel import (
    mesh_device,
    pop_tp_arguments,
    record_tensor_parallel,
    tensor_parallel_mesh,
)

if TYPE_CHECKING:
    from .model import PreTrainedModel

__all__ = ["LoadingMixin"]


class LoadingMixin:
    """Transformers' loading classmethods; the host class provides `_install` and `architecture`."""

    @classmethod
    def _architecture_for(cls, config) -> str:
        return cls.architecture or default_architecture(config)

    @classmethod
    def from_state(cls, state: ModelState) -> PreTrainedModel:
        """Wrap a state (its tensors become this model's parameters, shared, not copied)."""
        return cls(state.config, state=state)

    @classmethod
    def _from_config(cls, config, **kwargs: Any) -> PreTrainedModel:
        """A model with fresh weights from `config` (any config `PreTrainedModel` takes), as
        Transformers' `_from_config`: `dtype` (else `torch_dtype`, else the config's own
        `dtype`/`torch_dtype`) is the dtype the weights are drawn in, number for number as
        Transformers builds under that default dtype (`fmodel.transforms.hf_init.init`);
        `attn_implementation` is taken; any other keyword is an error, as in Transformers'
        model constructors."""
        torch_dtype = kwargs.pop("torch_dtype", None)
        dtype = kwargs.pop("dtype", None) or torch_dtype  # `dtype` wins, as in Transformers
        attn = kwargs.pop("attn_implementation", None)
        kwargs.pop("trust_remote_code", None)
        if kwargs:
            raise ArgumentTypeError(
                f"{cls.__name__}.__init__() got an unexpected keyword argument {next(iter(kwargs))!r}"
            )
        dtype = _config_dtype(config) if dtype in (None, "auto") else dtype
        dtype = check_float_dtype(dtype, f"{cls.__name__}.from_config(dtype)")
        if dtype is None or dtype == torch.float32 or registers_on_meta():
            model = cls(config)
            if dtype is not None:
                model.to(dtype)
        else:  # drawn in that dtype, as Transformers' construction under `set_default_dtype(dtype)`
            frozen = as_fmodel_config(config)
            arch = cls._architecture_for(frozen)
            state = transforms.init(frozen, architecture=arch, dtype=dtype, draw_order="transformers")
            model = cls(config, state=state)
        if attn is not None:
            model.set_attn_implementation(attn)
        return model

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
        `device_map`: None, a device, a dict of module name -> device ("disk" keeps a module's
        tensors memory-mapped from the checkpoint), or a strategy ("auto", "balanced",
        "balanced_low_0", "sequential"), which with accelerate installed is resolved as
        Transformers does (honouring `max_memory`; without it: the first GPU if any, else CPU).
        `model.hf_device_map` records the map, as Transformers'.
        Missing tensors (and, with `ignore_mismatched_sizes`, wrong-shape ones) are initialised
        and reported as Transformers does, drawn from torch's global RNG in its order
        (`fmodel.load(..., init_missing="transformers")`). A folder with a PEFT
        adapter (adapter_config.json) loads its base model, then the adapter (`adapter_name`,
        `adapter_kwargs`), as Transformers does (see `adapters.adapter_source`).
        `tp_plan="auto"` (or a dict plan; `tp_size`, `device_mesh`, `distributed_config` as
        Transformers 4.57) loads the model tensor parallel over the ranks, each reading only its
        slices (`fmodel.load(..., mesh=)`), the process group started from torchrun's
        environment if none is (see tensor_parallel.py); forward and generate give the
        single-process results on every rank, `save_pretrained` from every rank writes one
        checkpoint.
        """
        adapter_name = kwargs.pop("adapter_name", "default")
        adapter_kwargs = kwargs.pop("adapter_kwargs", None) or {}
        source = check_pretrained_path(pretrained_model_name_or_path, f"{cls.__name__}.from_pretrained")
        if isinstance(attn_implementation, str):  # refused before loading, as set_attn_implementation
            attention.get(attn_implementation)
        base = (
            None
            if kwargs.get("gguf_file")
            else adapter_source(source, revision=revision, cache_dir=cache_dir)
        )
        if base is not None:
            loaded = cls.from_pretrained(
                base, *model_args, config=config, cache_dir=cache_dir, torch_dtype=torch_dtype, dtype=dtype,
                device_map=device_map, revision=revision, local_files_only=local_files_only,
                attn_implementation=attn_implementation, output_loading_info=output_loading_info,
                ignore_mismatched_sizes=ignore_mismatched_sizes, **kwargs,
            )  # fmt: skip
            where = {"cache_dir": cache_dir, "revision": revision, "local_files_only": local_files_only}
            adapter_kwargs = {**{k: v for k, v in where.items() if v is not None}, **adapter_kwargs}
            return with_adapter(loaded, source, adapter_name, adapter_kwargs)
        gguf_file = kwargs.pop("gguf_file", None)
        variant = kwargs.pop("variant", None)
        from_tf, from_flax = kwargs.pop("from_tf", False), kwargs.pop("from_flax", False)
        if from_tf or from_flax:  # TF / Flax weights (fmodel.io.legacy): the folder must hold them
            from ..io.legacy import check_requested_format

            check_requested_format(source, "tf" if from_tf else "flax")
        max_memory = kwargs.pop("max_memory", None)
        tensor_parallel = pop_tp_arguments(kwargs, device_map, f"{cls.__name__}.from_pretrained")
        for name in _IGNORED_LOAD_KWARGS:
            kwargs.pop(name, None)
        is_gguf = gguf_file is not None or source.endswith(".gguf")
        if config is not None:
            config = as_fmodel_config(config)
        elif kwargs and not is_gguf:
            files = resolve_checkpoint(
                source,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                variant=variant,
            )
            config = load_config(files.config)
        if kwargs:  # config attributes (num_labels, id2label, ...), as Transformers' config kwargs
            view = DetachedConfig(config) if config is not None else None
            unused = {k: v for k, v in kwargs.items() if view is None or not hasattr(view, k)}
            if unused:
                raise ArgumentTypeError(
                    f"{cls.__name__}.__init__() got an unexpected keyword argument {next(iter(unused))!r} "
                    "(it is neither a from_pretrained option nor a config attribute)"
                )
            for key, value in kwargs.items():
                setattr(view, key, value)
            config = view.frozen()
        per_module = device_map if isinstance(device_map, dict) else None
        # a strategy ("auto", ...) is resolved on the loaded model, as Transformers (accelerate)
        strategy = device_map in DEVICE_MAP_STRATEGIES and find_spec("accelerate") is not None
        device = None if per_module is not None or strategy else _device_from_map(device_map)
        mesh = None
        if tensor_parallel is not None:  # the process group and mesh first: no reading without them
            mesh = tensor_parallel_mesh(tensor_parallel, f"{cls.__name__}.from_pretrained")
            device = mesh_device(mesh)
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
            gguf_file=gguf_file,
            variant=variant,
            init_missing="fmodel" if is_gguf else "transformers",  # Transformers' draws, global RNG
            # tensor parallel: each rank reads its slices of the sharded tensors
            **({} if mesh is None else {"mesh": mesh, "plan": tensor_parallel.explicit_plan}),
        )
        if report.unexpected:
            logger.warning("Some weights of the checkpoint were not used: %s", list(report.unexpected))
        model = cls.from_state(state)
        if mesh is not None:
            record_tensor_parallel(model, mesh, tensor_parallel)
        model.config.name_or_path = source
        model.config._commit_hash = _commit_hash(source, revision, cache_dir)
        if strategy:
            per_module = model._infer_device_map(device_map, max_memory)
        if per_module is not None:
            model._place_by_device_map(per_module)
        elif device_map is not None:  # one device, as Transformers records it
            model.hf_device_map = {"": device_map if isinstance(device_map, int) else model.device}
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

        if hf_quantizer is not None or device_mesh is not None:
            raise InvalidArgumentError(
                "_load_pretrained_model: hf_quantizer and device_mesh are Transformers-only"
            )
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
            model._frozen_config,
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

    @classmethod
    def _load_from_tf(cls, model: PreTrainedModel, config, checkpoint_files: list[str]):
        """Transformers' `_load_from_tf`: the weights of TF 2 files written by Transformers
        (`tf_model.h5`, or its shards, all of them read) into `model`, names and layouts converted
        as `load_tf2_checkpoint_in_pytorch_model` does, without TensorFlow (h5py reads the file,
        `fmodel.io.legacy`). Returns `(model, loading_info)` with `missing_keys` and
        `unexpected_keys`, as there; missing tensors are initialised. `config` is unused, as in
        Transformers' TF 2 path (it serves TensorFlow 1 checkpoints, which only TensorFlow reads:
        a `.index` file raises CheckpointError)."""
        from ..io.legacy import read_legacy_files

        tensors = read_legacy_files(checkpoint_files, "tf")
        model, missing, unexpected, *_ = cls._load_pretrained_model(
            model, tensors, None, checkpoint_files[0] if checkpoint_files else None
        )
        return model, {"missing_keys": missing, "unexpected_keys": unexpected}

    @classmethod
    def _load_from_flax(cls, model: PreTrainedModel, checkpoint_files: list[str]):
        """Transformers' `_load_from_flax`: the weights of Flax msgpack files written by
        Transformers (`flax_model.msgpack`, or its shards) into `model`, converted as
        `load_flax_checkpoint_in_pytorch_model` does, without JAX (msgpack reads the file).
        Returns the model, as there."""
        from ..io.legacy import read_legacy_files

        tensors = read_legacy_files(checkpoint_files, "flax")
        return cls._load_pretrained_model(
            model, tensors, None, checkpoint_files[0] if checkpoint_files else None
        )[0]


def _config_dtype(config) -> Any:
    """The dtype a config asks for (`dtype`, or the older `torch_dtype`; None when it names none),
    as Transformers' `_from_config` reads `config.dtype`."""
    if isinstance(config, dict):
        return config.get("dtype") or config.get("torch_dtype")
    extra = getattr(config, "extra", None)  # fmodel's frozen config keeps them in `extra`
    if extra is not None and not isinstance(config, ConfigView):
        return extra.get("dtype") or extra.get("torch_dtype")
    return getattr(config, "dtype", None)


def _saved_generation_config(path, revision, cache_dir, local_files_only) -> dict | None:
    """The checkpoint's generation_config.json as written (None when it has none)."""
    from ..generation.config import GENERATION_CONFIG_NAME, _find, _read_json

    path = os.fspath(path)
    if path.endswith(".gguf"):
        return None
    if os.path.isdir(path):
        found = _find(path, GENERATION_CONFIG_NAME, revision, cache_dir, local_files_only)
    else:  # a hub id: one probe, no hidden retries (the weights were found, so the cache is good)
        from ..errors import CheckpointError
        from ..io.hub_fetch import HubFetcher

        try:
            hub = HubFetcher(path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
            found = hub.fetch(GENERATION_CONFIG_NAME)
        except CheckpointError:  # the hub unreachable and the file not cached: none
            found = None
    return None if found is None else _read_json(found)


def _device_from_map(device_map: Any) -> torch.device | None:
    if device_map is None:
        return None
    if device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        return torch.device("cuda") if torch.cuda.is_available() else None
    if isinstance(device_map, (str, int, torch.device)):
        try:
            return check_device(device_map, "from_pretrained(device_map)")
        except InvalidArgumentError as exc:  # also a RuntimeError, as torch.device's own
            raise DeviceArgumentError(
                f"{exc}; device_map also takes 'auto', 'balanced', 'balanced_low_0', 'sequential' or a dict"
            ) from None
    raise InvalidArgumentError(
        f"device_map {device_map!r}: expected None, 'auto', a device, or a dict of module name -> device"
    )


# Transformers' from_pretrained options with nothing to do here (fmodel never runs checkpoint
# code, reads safetensors first and loads lazily anyway).
_IGNORED_LOAD_KWARGS = (
    "trust_remote_code",
    "use_safetensors",
    "low_cpu_mem_usage",
    "force_download",
    "resume_download",
    "proxies",
    "token",
    "use_auth_token",
    "_fast_init",
    "offload_folder",
    "offload_state_dict",
    "offload_buffers",
    "weights_only",
    "from_auto_class",
    "_from_pipeline",
    "adapter_kwargs",
    "key_mapping",
    "subfolder",
    "mirror",
    "user_agent",
)


def _commit_hash(source: str, revision: str | None, cache_dir) -> str | None:
    """The hub snapshot's commit for a repo id (the snapshot folder's name), else None."""
    if os.path.isdir(source):
        return None
    try:
        files = resolve_checkpoint(source, revision=revision, cache_dir=cache_dir, local_files_only=True)
    except Exception:
        return None
    folder = os.path.basename(os.path.normpath(files.folder))
    return folder if len(folder) == 40 else None
