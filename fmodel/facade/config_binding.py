"""`ConfigBindingMixin`: the facade's `model.config` (a `ConfigView`) and how a write to it
reaches the model: `_replace_config` installs the new frozen config in the live module tree."""

from __future__ import annotations

from typing import Any

from torch import nn

from .. import transforms
from ..errors import ConfigError
from ..models import get_spec
from ..models.skeleton import expected_shapes, skeleton
from .base_call import plain_class
from .config_view import ConfigView, as_fmodel_config
from .module_tree import set_tensor

__all__ = ["ConfigBindingMixin"]


class ConfigBindingMixin:
    """`config`, `name_or_path` and `_replace_config`; the host class provides `state`,
    `_install`, `_tree`, `_frozen_config`, `_architecture` and `_ties`."""

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
                set_tensor(
                    self,
                    name,
                    tensor.to(device=buffers[name].device, dtype=buffers[name].dtype),
                    parameter=False,
                )
        object.__setattr__(self, "_frozen_config", new)


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
