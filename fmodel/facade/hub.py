"""`HubMixin`: Transformers' saving and hub methods for the `PreTrainedModel` facade.

`save_pretrained`, `push_to_hub`, `add_model_tags` and `register_for_auto_class` with
Transformers 4.57's signatures. The methods only sort out arguments; the work is done by
`fmodel.io.save`, `fmodel.io.push` and `fmodel.io.auto_class` on `self.state`.

The host class provides `state` (a `ModelState`); the generation_config.json written is
`facade.generation.saved_generation_config(self)`: the one the model was loaded with
(`_generation_config_dict` in the instance `__dict__`) while `model.generation_config` is
unchanged, else that config's differences from the defaults, else the one derived from the config.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..errors import ArgumentTypeError, InvalidArgumentError, UnsupportedOptionError
from ..io.auto_class import auto_class_name
from ..io.card import merge_tags
from ..io.push import default_commit_message, save_and_push
from ..io.push import push_to_hub as _push_to_hub
from ..io.save import save
from .adapters import has_adapters, save_adapter
from .arg_checks import check_repo_id
from .generation import saved_generation_config
from .tensor_parallel import distributed_tensors

if TYPE_CHECKING:
    from ..state import ModelState

__all__ = ["HubMixin"]

_PUSH_OPTIONS = ("repo_id", "commit_message", "commit_description", "create_pr", "private", "revision")


def _token(token: str | bool | None, kwargs: dict[str, Any]) -> str | bool | None:
    """Transformers' deprecated `use_auth_token` spelling of `token`, popped from `kwargs`."""
    use_auth_token = kwargs.pop("use_auth_token", None)
    if use_auth_token is None:
        return token
    warnings.warn(
        "The `use_auth_token` argument is deprecated; use `token` instead.", FutureWarning, stacklevel=3
    )
    if token is not None:
        raise InvalidArgumentError(
            "`token` and `use_auth_token` are both specified. Please set only the argument `token`."
        )
    return use_auth_token


class HubMixin:
    """Transformers' `save_pretrained` / `push_to_hub` / `add_model_tags` / `register_for_auto_class`.

    Attributes:
        model_tags: tags added by `add_model_tags` (None until then), written to the model card.
        _auto_class: the Auto class name given to `register_for_auto_class` (class attribute).
    """

    model_tags: list[str] | None = None
    _auto_class: ClassVar[str | None] = None
    if TYPE_CHECKING:
        state: ModelState  # provided by the host class (`PreTrainedModel.state`)

    def add_model_tags(self, tags: list[str] | str) -> None:
        """Add tags for the model card (a string is one tag); tags already there are skipped,
        order is kept. They go into README.md's `tags:` metadata on `save_pretrained` and
        `push_to_hub` (Transformers writes them only when pushing)."""
        self.model_tags = merge_tags(self.model_tags, tags)

    @classmethod
    def register_for_auto_class(cls, auto_class: str | type = "AutoModel") -> None:
        """Record `auto_class` for this class, as Transformers does; no `auto_map` is written.

        fmodel's classes are Transformers' own architectures, which Transformers' Auto classes
        load without remote code; an `auto_map` would make Transformers demand
        `trust_remote_code=True` and import fmodel's module from the checkpoint folder (see
        `fmodel.io.auto_class`). Checkpoints saved after registering are therefore the same as
        without it.

        Arguments:
            auto_class: a model Auto class or its name ("AutoModelForCausalLM", ...).

        Raises:
            ValueError: not a model Auto class of Transformers.
        """
        cls._auto_class = auto_class_name(auto_class)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
        save_function: Callable[[dict[str, torch.Tensor], str], Any] | None = None,
        push_to_hub: bool = False,
        max_shard_size: int | str = "5GB",
        safe_serialization: bool = True,
        variant: str | None = None,
        token: str | bool | None = None,
        save_peft_format: bool = True,
        **kwargs: Any,
    ) -> None:
        """Save the model as Transformers does, atomically (see `fmodel.save`).

        Writes config.json, the weights and, for a causal LM, generation_config.json (the one
        the model was loaded with, else an existing file is kept, else the one derived from the
        config); tags from `add_model_tags` are merged into README.md.

        Arguments:
            save_directory: the folder (created if absent; a file there raises, where
                Transformers logs an error and returns).
            is_main_process: False writes nothing and pushes nothing (Transformers still writes
                the weights on every process and leaves the rest to `save_function`). A model
                with distributed tensors (`from_pretrained(tp_plan=...)`, FSDP2) is saved by
                every rank together whatever this says: each gathers the full tensors, rank 0
                writes one ordinary checkpoint, the others wait until it is written.
            state_dict: save these tensors instead of the model's, by Transformers' names; a tied
                alias given beside its source is stored once.
            save_function: writes one pickle shard (`safe_serialization=False`); default
                `torch.save`.
            push_to_hub: after saving, commit what changed in the folder to the hub repo
                `kwargs["repo_id"]` (default: the folder's name); `commit_message`,
                `commit_description`, `create_pr`, `private`, `revision` are read from `kwargs`.
            max_shard_size: shard size limit ("5GB", bytes as int).
            safe_serialization: safetensors (default) or pickle `pytorch_model.bin`.
            variant: weight file variant (model.fp16.safetensors, ...).
            token: hub token for `push_to_hub` (`use_auth_token` is accepted, deprecated).
            save_peft_format: with PEFT adapters attached (`add_adapter`, `load_adapter`), only
                the active adapter is written, in PEFT's format (see `adapters.save_adapter`);
                True prefixes its keys with `base_model.model.`, as Transformers.
            kwargs: the push options above, `ignore_metadata_errors` (model card metadata that
                cannot be interpreted is dropped, see `fmodel.io.card.tag_model_card`) and
                `save_config` (old name of
                `is_main_process`). Other keys are ignored with a warning, as Transformers
                ignores them when not pushing.

        Raises:
            CheckpointError: `save_directory` is a file; a tied alias and its source differ in
                `state_dict`.
            TypeError: unknown keyword arguments with `push_to_hub=True`.
        """
        token = _token(token, kwargs)
        if "save_config" in kwargs:
            is_main_process = kwargs.pop("save_config")
        ignore_metadata_errors = bool(kwargs.pop("ignore_metadata_errors", False))
        push_options = {key: kwargs.pop(key) for key in _PUSH_OPTIONS if key in kwargs}
        if kwargs:
            if push_to_hub:
                raise ArgumentTypeError(
                    f"save_pretrained(push_to_hub=True): unexpected arguments {sorted(kwargs)}"
                )
            warnings.warn(f"save_pretrained: ignoring unknown arguments {sorted(kwargs)}", stacklevel=2)
        distributed = distributed_tensors(self)
        if not is_main_process and not distributed:
            return
        if has_adapters(self):  # PEFT adapters added by add_adapter/load_adapter: the adapter only
            if push_to_hub:
                raise UnsupportedOptionError(
                    "save_pretrained(push_to_hub=True) of a model with adapters: save it into a folder and "
                    "upload that folder (huggingface_hub.upload_folder)"
                )
            save_adapter(
                self,
                save_directory,
                state_dict=state_dict,
                safe_serialization=safe_serialization,
                save_function=save_function,
                save_peft_format=save_peft_format,
            )
            return
        options: dict[str, Any] = {
            "max_shard_size": max_shard_size,
            "safe_serialization": safe_serialization,
            "variant": variant,
            "tensors": state_dict,
            "save_function": save_function,
            "generation_config": saved_generation_config(self),
            "tags": self.model_tags,
            "ignore_metadata_errors": ignore_metadata_errors,
        }
        if push_to_hub and distributed:
            raise UnsupportedOptionError(
                "save_pretrained(push_to_hub=True) of a model with distributed tensors: save it into a "
                "folder from every rank, then upload that folder from one (huggingface_hub.upload_folder)"
            )
        if push_to_hub:
            if push_options.get("commit_message") is None:
                push_options["commit_message"] = _commit_message(self)
            save_and_push(self.state, save_directory, token=token, **push_options, **options)
        else:  # distributed tensors (tensor parallel, FSDP2): every rank gathers, rank 0 writes
            save(self.state, save_directory, **options)

    def push_to_hub(
        self,
        repo_id: str,
        use_temp_dir: bool | None = None,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        max_shard_size: int | str | None = "5GB",
        create_pr: bool = False,
        safe_serialization: bool = True,
        revision: str | None = None,
        commit_description: str | None = None,
        tags: list[str] | str | None = None,
        **deprecated_kwargs: Any,
    ):
        """Save the model into a working folder and commit it to the hub repo `repo_id`.

        As Transformers' `push_to_hub` (see `fmodel.io.push.push_to_hub`): the repo is created
        if needed, the files the save created or changed are committed in one commit, and the
        model card carries `model_tags` plus `tags` (`model_tags` itself is left unchanged,
        where Transformers appends `tags` to it).

        Arguments:
            repo_id: "name" or "org/name".
            use_temp_dir: save into a temporary folder (default: unless a folder named like the
                repo exists in the current directory).
            commit_message: default "Upload model" / "Upload <class name>", as Transformers.
            private, token, create_pr, revision, commit_description: passed to the hub.
            max_shard_size, safe_serialization: as `save_pretrained`.
            tags: extra model card tags.
            deprecated_kwargs: `use_auth_token` (old name of `token`), `ignore_metadata_errors`.

        Returns:
            huggingface_hub's `CommitInfo`.

        Raises:
            TypeError: other keyword arguments (Transformers' long-deprecated `repo_url`,
                `organization`, `repo_path_or_name` are not supported).
        """
        check_repo_id(repo_id)
        token = _token(token, deprecated_kwargs)
        ignore_metadata_errors = bool(deprecated_kwargs.pop("ignore_metadata_errors", False))
        if deprecated_kwargs:
            raise ArgumentTypeError(f"push_to_hub: unexpected arguments {sorted(deprecated_kwargs)}")
        return _push_to_hub(
            self.state,
            repo_id,
            use_temp_dir=use_temp_dir,
            commit_message=_commit_message(self) if commit_message is None else commit_message,
            private=private,
            token=token,
            max_shard_size="5GB" if max_shard_size is None else max_shard_size,
            create_pr=create_pr,
            safe_serialization=safe_serialization,
            revision=revision,
            commit_description=commit_description,
            tags=merge_tags(self.model_tags, tags),
            generation_config=saved_generation_config(self),
            ignore_metadata_errors=ignore_metadata_errors,
        )


def _commit_message(model: object) -> str:
    return default_commit_message(type(model).__name__)
