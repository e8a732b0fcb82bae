"""TensorFlow and Flax tensor names -> PyTorch state names, and the layout changes that go with
them, as Transformers 4.57's converters make them (`modeling_tf_pytorch_utils` and
`modeling_flax_pytorch_utils`). Pure functions on names, shapes and tensors: no file is read here.

TensorFlow (`convert_tf_weight_name_to_pt_weight_name`): `tf_bert_model/bert/encoder/layer_._0/
attention/self/query/kernel:0` -> `bert.encoder.layer.0.attention.self.query.weight`, transposed.
The `:0` device suffix goes, the first level (the Keras model's own name) goes, `a___b` levels
become `b` (TF BERT's `mlm___cls` is PyTorch's `cls`), `_._` separates list indices; `kernel`,
`embeddings` and `gamma` become `weight`, `beta` becomes `bias`; a 2-D `kernel` is transposed, a
3-D one is a Conv1D (axes reversed), a 4-D one a Conv2D. GPT-2's TF `Conv1D` stores `weight` as
PyTorch does (not transposed) and its biases as (1, N): Transformers reshapes those to the
PyTorch parameter's (N,), and so does `fit_tf_tensor`.

Flax (`load_flax_weights_in_pytorch_model`): nested keys joined by `.`, `kernel` -> `weight`
transposed (axes (3, 2, 0, 1) for a 4-D convolution kernel), `scale` / `embedding` -> `weight`,
batch-norm `mean` / `var` -> `running_mean` / `running_var`. Shapes must then match exactly.

Both leave the model-name prefix (`bert.`, `transformer.`, `model.`) as stored: fmodel's
`map_keys` drops or adds it for a base or head class exactly as the converters do.
"""

from __future__ import annotations

import re

import torch

__all__ = [
    "fit_flax_tensor",
    "fit_tf_tensor",
    "flax_to_pt_name",
    "tf_full_name",
    "tf_shard_dataset_name",
    "tf_to_pt_name",
]

# Transformers' own guard against pathological names (ReDoS) in the `___` rule.
_MAX_NAME = 2048
_MAX_TRIPLE = 10


def tf_to_pt_name(tf_name: str, ndim: int) -> tuple[str, str]:
    """`(pytorch name, transpose)` of a TF 2 weight name (its first level is the Keras model's
    name and is dropped, as Transformers drops it). `transpose` is "no", "simple", "conv1d" or
    "conv2d". Raises ValueError on a name Transformers refuses (too long / too many `___`)."""
    name = tf_name.replace(":0", "")
    if (len(name) > _MAX_NAME and "___" in name) or name.count("___") > _MAX_TRIPLE:
        raise ValueError(f"TF variable name is too long or has too many ___ separators: {tf_name[:200]!r}")
    name = re.sub(r"/[^/]*___([^/]*)/", r"/\1/", name)
    name = name.replace("_._", "/")
    name = re.sub(r"//+", "/", name)
    parts = name.split("/")
    if len(parts) > 1:
        parts = parts[1:]
    last = parts[-1]
    if last == "kernel" and ndim == 4:
        transpose = "conv2d"
    elif last == "kernel" and ndim == 3:
        transpose = "conv1d"
    elif (
        last in ("kernel", "pointwise_kernel", "depthwise_kernel")
        or "emb_projs" in parts
        or "out_projs" in parts
    ):
        transpose = "simple"
    else:
        transpose = "no"
    if last in ("kernel", "embeddings", "gamma"):
        parts[-1] = "weight"
    elif last == "beta":
        parts[-1] = "bias"
    elif last in ("pointwise_kernel", "depthwise_kernel"):
        parts[-1] = last.replace("_kernel", ".weight")
    return ".".join(parts), transpose


def tf_shard_dataset_name(full_name: str) -> str:
    """Where TF `save_pretrained` puts weight `full_name` inside a shard file: without its first
    level, unless the name holds "model." or has a single level (`modeling_tf_utils`)."""
    if "model." in full_name or len(full_name.split("/")) == 1:
        return full_name
    return "/".join(full_name.split("/")[1:])


def tf_full_name(dataset_name: str) -> str:
    """The inverse of `tf_shard_dataset_name` for `tf_to_pt_name`: a shard's dataset name with a
    first level for the converter to drop. A name kept whole by the rule above stays whole (a
    one-level name converts the same either way)."""
    if "model." in dataset_name or "/" not in dataset_name:
        return dataset_name
    return "model/" + dataset_name


def _permute(tensor: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    return tensor.permute(*axes).contiguous()


def fit_tf_tensor(tensor: torch.Tensor, transpose: str, pt_name: str) -> torch.Tensor:
    """The TF tensor in PyTorch's layout: transposed as `transpose` says; a (1, N) bias (GPT-2's
    TF Conv1D) as (N,), the reshape Transformers' `apply_transpose` makes to fit PyTorch's
    1-D bias. Other shapes are left for the architecture check to accept or refuse."""
    if transpose == "conv2d":
        tensor = _permute(tensor, (3, 2, 0, 1))
    elif transpose == "conv1d":
        tensor = _permute(tensor, (2, 1, 0))
    elif transpose == "simple" and tensor.ndim >= 2:
        tensor = _permute(tensor, tuple(reversed(range(tensor.ndim))))
    if pt_name.endswith("bias") and tensor.ndim == 2 and tensor.shape[0] == 1:
        tensor = tensor.reshape(tensor.shape[1])
    return tensor


def flax_to_pt_name(key: tuple[str, ...], ndim: int) -> tuple[str, str]:
    """`(pytorch name, transpose)` of a flattened Flax parameter key; `transpose` is "no",
    "simple" (a Dense kernel) or "conv2d" (a 4-D convolution kernel)."""
    *head, last = key
    transpose = "no"
    if last == "kernel":
        last, transpose = "weight", ("conv2d" if ndim == 4 else "simple")
    elif last in ("scale", "embedding"):
        last = "weight"
    elif "mean" in last:
        last = "running_mean"
    elif "var" in last:
        last = "running_var"
    return ".".join((*head, last)), transpose


def fit_flax_tensor(tensor: torch.Tensor, transpose: str) -> torch.Tensor:
    """The Flax tensor in PyTorch's layout (`kernel.T`, or axes (3, 2, 0, 1) for a 4-D kernel)."""
    if transpose == "conv2d":
        return _permute(tensor, (3, 2, 0, 1))
    if transpose == "simple" and tensor.ndim >= 2:
        return _permute(tensor, tuple(reversed(range(tensor.ndim))))
    return tensor
