"""Tensor-parallel plans as data: which module of a model class is split over the ranks of a
1-D device mesh, and how; pure functions from a tensor's name and shape to its rank's slice.

A plan is a mapping {module pattern: style}. A pattern is a module name of the class (as
`skeleton.named_modules()` gives it) in which `*` stands for exactly one dotted component
(a layer or expert index): "model.layers.*.self_attn.q_proj". The first matching key wins.
Each family's plan is `ArchSpec.tp_plan(config)`; tensors of modules no key matches are
replicated. Styles (for `nn.Linear`, weight [out, in]):

    "colwise"         weight and bias split on dim 0 (the output features): the module returns
                      its rank's slice of the output. A 1-D tensor (a norm's weight over a
                      projection, OLMo 2's q_norm) is split on dim 0 the same way.
    "rowwise"         weight split on dim 1 (the input features), bias replicated: the module
                      takes its rank's slice of the input and its output is summed over the
                      ranks (an all-reduce) into a replicated tensor; the bias is added once.
    "colwise_rep"     "colwise" whose output is gathered so every rank holds all of it (the LM
                      head). The split may be uneven (torch.chunk sizes: GPT-2's 50257 words).
    "packed_colwise:a,b,..."
                      a fused projection whose dim 0 is sections in the proportions a:b:...
                      (Phi-3's qkv_proj "packed_colwise:H,H_kv,H_kv" in heads; gate_up_proj
                      "packed_colwise:1,1"): each section is split on its own and rank r holds
                      its block of every section, concatenated in section order, so it computes
                      whole local heads (Transformers replicates these instead).
    "embedding"       vocab-parallel embedding: the weight [vocab, hidden] split on dim 0
                      (torch.chunk sizes); each rank looks up the ids in its range and the
                      ranks' rows are summed (exact: one of them is nonzero). Used for the
                      input embeddings, so that a head tied to them ("colwise_rep") is one tensor.
    "conv1d_colwise", "conv1d_rowwise", "conv1d_packed_colwise:a,b,..."
                      the same for GPT-2's `Conv1D`, whose weight is stored [in, out]: the
                      weight's split dims are swapped (colwise splits dim 1, rowwise dim 0).

Every split but "colwise_rep" and "embedding" must be even (`PlanDivisibilityError`
otherwise); `fmodel.distribute` checks the config's heads / kv heads / experts / FFN width first
so the message names the size that does not divide.

A sharded tensor of a distributed state is a DTensor with `Shard(dim)` over the mesh whose
local tensor is this module's slice (`shard_slice`). For a packed tensor the DTensor's global
view is the ranks' blocks in rank order, not the checkpoint's order: `full_tensor` (and
`to_checkpoint_order`) give the checkpoint's tensor back. Build such tensors with
`to_dtensor`, which records each tensor's `Placement` (`layout_of`), so savers and the forward
know how a tensor was split.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache

import attrs
import torch

from ..errors import PlanDivisibilityError, PlanError

__all__ = [
    "STYLES",
    "Placement",
    "chunk_ranges",
    "full_tensor",
    "layout_of",
    "local_shard",
    "match_plan",
    "module_style",
    "parse_style",
    "placement",
    "shard_slice",
    "to_checkpoint_order",
    "to_dtensor",
    "unmatched_keys",
]

STYLES = ("colwise", "rowwise", "colwise_rep", "packed_colwise", "embedding")


@attrs.frozen
class Style:
    """A parsed style: `kind` one of STYLES, `conv1d` for [in, out] weights, and the packed
    sections' proportions (() unless packed)."""

    kind: str
    conv1d: bool = False
    sections: tuple[int, ...] = ()


@lru_cache(maxsize=256)
def parse_style(style: str) -> Style:
    """ "conv1d_packed_colwise:1,1,1" -> Style("packed_colwise", True, (1, 1, 1)).

    Raises:
        PlanError: an unknown style, or packed sections that are not positive integers.
    """
    if not isinstance(style, str):
        raise PlanError(f"a plan style must be a string, got {type(style).__name__} {style!r}")
    body, _, args = style.partition(":")
    conv1d = body.startswith("conv1d_")
    kind = body.removeprefix("conv1d_")
    if kind not in STYLES or (conv1d and kind not in ("colwise", "rowwise", "packed_colwise")):
        raise PlanError(
            f"unknown tensor-parallel style {style!r}; styles are {list(STYLES)}, "
            "'conv1d_' + colwise / rowwise / packed_colwise for [in, out] weights"
        )
    sections: tuple[int, ...] = ()
    if kind == "packed_colwise":
        try:
            sections = tuple(int(x) for x in args.split(","))
        except ValueError:
            sections = ()
        if not sections or min(sections) <= 0:
            raise PlanError(
                f"style {style!r}: packed_colwise needs its sections' proportions, e.g. "
                "'packed_colwise:8,2,2' (heads of q, k, v) or 'packed_colwise:1,1' (gate, up)"
            )
    elif args:
        raise PlanError(f"style {style!r}: only packed_colwise takes arguments")
    return Style(kind, conv1d, sections)


@lru_cache(maxsize=1024)
def _pattern(key: str) -> re.Pattern:
    return re.compile("\\.".join("[^.]+" if part == "*" else re.escape(part) for part in key.split(".")))


def module_style(module: str, plan: Mapping[str, str]) -> str | None:
    """The style of the first key of `plan` matching module name `module`, else None."""
    for key, style in plan.items():
        if _pattern(key).fullmatch(module):
            return style
    return None


def match_plan(modules: Iterable[str], plan: Mapping[str, str]) -> dict[str, str]:
    """{module: style} for each of `modules` that `plan` shards (styles validated)."""
    for style in plan.values():
        parse_style(style)
    out = {}
    for name in modules:
        style = module_style(name, plan)
        if style is not None:
            out[name] = style
    return out


def unmatched_keys(modules: Iterable[str], plan: Mapping[str, str]) -> list[str]:
    """The keys of `plan` that match none of `modules`."""
    names = list(modules)
    return [key for key in plan if not any(_pattern(key).fullmatch(n) for n in names)]


def chunk_ranges(size: int, world: int) -> list[tuple[int, int]]:
    """torch.chunk's (and DTensor's `Shard`'s) split of `size` over `world` ranks: blocks of
    ceil(size / world), the last ones shorter or empty. [(start, stop)] per rank."""
    block = -(-size // world) if size else 0
    return [(min(r * block, size), min((r + 1) * block, size)) for r in range(world)]


@attrs.frozen
class Placement:
    """How one tensor is split over the ranks.

    Attributes:
        dim: the split dim, or None for a replicated tensor.
        kind: the style's kind ("colwise", ...), None when replicated.
        sections: the sizes along `dim` of the sections that are split separately (one section,
            the whole dim, unless packed).
        even: every section must divide evenly by the world size.
        style: the plan's style string (None when replicated).
    """

    dim: int | None
    kind: str | None = None
    sections: tuple[int, ...] = ()
    even: bool = True
    style: str | None = None

    @property
    def packed(self) -> bool:
        return len(self.sections) > 1

    def ranges(self, world: int, rank: int, name: str = "tensor") -> list[tuple[int, int]]:
        """[(start, stop)] along `dim` of rank `rank`'s blocks, one per section, concatenated in
        this order to make its local tensor.

        Raises:
            PlanDivisibilityError: an even split of a section `world` does not divide.
        """
        if self.dim is None:
            raise PlanError(f"{name} is replicated: it has no ranges")
        out, start = [], 0
        for size in self.sections:
            if self.even and size % world:
                raise PlanDivisibilityError(
                    f"{name}: dim {self.dim} ({'a section of ' if self.packed else ''}{size}) is not "
                    f"divisible by the mesh size {world} (style {self.style!r}); sizes that work: "
                    f"{_divisors(size)}"
                )
            lo, hi = chunk_ranges(size, world)[rank]
            out.append((start + lo, start + hi))
            start += size
        return out

    def local_shape(self, shape: Sequence[int], world: int, rank: int) -> tuple[int, ...]:
        shape = tuple(shape)
        if self.dim is None:
            return shape
        n = sum(hi - lo for lo, hi in self.ranges(world, rank))
        return (*shape[: self.dim], n, *shape[self.dim + 1 :])


REPLICATED = Placement(dim=None)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def placement(name: str, shape: Sequence[int], plan: Mapping[str, str]) -> Placement:
    """How tensor `name` (e.g. "model.layers.0.self_attn.q_proj.weight") of shape `shape` is
    split under `plan`: its module is `name` without the last component."""
    module, _, param = name.rpartition(".")
    style = module_style(module, plan)
    if style is None:
        return REPLICATED
    s = parse_style(style)
    ndim = len(shape)
    if ndim == 0:
        return REPLICATED
    if s.kind == "rowwise":
        if param == "bias" or ndim == 1:
            return REPLICATED
        dim = 0 if s.conv1d else ndim - 1
    elif ndim == 1:
        dim = 0  # a bias (or a norm over the projection) follows the output features
    else:
        dim = ndim - 1 if s.conv1d else 0
    size = int(shape[dim])
    if s.kind == "packed_colwise":
        total = sum(s.sections)
        if size % total:
            raise PlanError(
                f"{name}: dim {dim} ({size}) cannot be cut into sections in the proportions "
                f"{s.sections} of style {style!r}"
            )
        sections = tuple(size // total * p for p in s.sections)
    else:
        sections = (size,)
    even = s.kind not in ("colwise_rep", "embedding")
    return Placement(dim=dim, kind=s.kind, sections=sections, even=even, style=style)


def shard_slice(
    name: str, shape: Sequence[int], plan: Mapping[str, str], world: int, rank: int
) -> tuple[tuple[slice, ...], ...]:
    """Index tuples into the full tensor whose pieces, concatenated along the split dim (in this
    order), are rank `rank`'s local tensor: one tuple for a plain split or a replicated tensor
    (all of it), one per section for a packed one. What a sharded loader reads."""
    p = placement(name, shape, plan)
    full = tuple(slice(None) for _ in shape)
    if p.dim is None:
        return (full,)
    return tuple(
        (*full[: p.dim], slice(lo, hi), *full[p.dim + 1 :]) for lo, hi in p.ranges(world, rank, name)
    )


def local_shard(
    tensor: torch.Tensor, name: str, plan: Mapping[str, str], world: int, rank: int
) -> torch.Tensor:
    """Rank `rank`'s local tensor of the full `tensor` (a view when one block; replicated: the
    tensor itself)."""
    p = placement(name, tensor.shape, plan)
    if p.dim is None:
        return tensor
    pieces = [tensor[idx] for idx in shard_slice(name, tensor.shape, plan, world, rank)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=p.dim)


def to_checkpoint_order(gathered: torch.Tensor, p: Placement, world: int) -> torch.Tensor:
    """The checkpoint's tensor from the ranks' local tensors concatenated in rank order along
    `p.dim` (what `DTensor.full_tensor()` gives): the identity unless packed."""
    if not p.packed:
        return gathered
    per_rank = [sum(hi - lo for lo, hi in p.ranges(world, r)) for r in range(world)]
    rank_blocks = gathered.split(per_rank, dim=p.dim)
    sections = []
    for s in range(len(p.sections)):
        parts = []
        for r, block in enumerate(rank_blocks):
            sizes = [hi - lo for lo, hi in p.ranges(world, r)]
            parts.append(block.split(sizes, dim=p.dim)[s])
        sections.append(torch.cat(parts, dim=p.dim))
    return torch.cat(sections, dim=p.dim)


class IdentityWeakMap:
    """{object: value} by identity, holding its keys weakly (a `WeakKeyDictionary` compares
    keys with ==, which a tensor answers elementwise)."""

    def __init__(self) -> None:
        self._data: dict[int, tuple[weakref.ref, object]] = {}

    def __len__(self) -> int:
        return len(self._data)

    def __setitem__(self, key: object, value: object) -> None:
        i = id(key)

        def forget(ref: weakref.ref, i: int = i, data: dict = self._data) -> None:
            if data.get(i, (None,))[0] is ref:
                del data[i]

        self._data[i] = (weakref.ref(key, forget), value)

    def get(self, key: object, default: object = None) -> object:
        entry = self._data.get(id(key))
        return entry[1] if entry is not None and entry[0]() is key else default


_LAYOUTS = IdentityWeakMap()


def layout_of(tensor: torch.Tensor) -> Placement | None:
    """The `Placement` recorded by `to_dtensor` for this tensor, else None."""
    return _LAYOUTS.get(tensor)


def to_dtensor(local: torch.Tensor, p: Placement, mesh, shape: Sequence[int]) -> torch.Tensor:
    """A DTensor on the 1-D `mesh` whose local tensor is `local` (this rank's `local_shard`) of
    a full tensor of `shape`; `Shard(p.dim)` or `Replicate()`. Records `p` (`layout_of`)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    shape = torch.Size(shape)
    placements = [Replicate()] if p.dim is None else [Shard(p.dim)]
    stride = torch.empty(shape, device="meta").stride()
    out = DTensor.from_local(local.detach(), mesh, placements, run_check=False, shape=shape, stride=stride)
    if local.requires_grad:
        out.requires_grad_(True)
    _LAYOUTS[out] = p
    return out


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The full, checkpoint-ordered tensor of a (possibly distributed) tensor: a collective on
    every rank of the mesh for a sharded DTensor; a plain tensor is returned as it is."""
    from torch.distributed.tensor import DTensor

    if not isinstance(tensor, DTensor):
        return tensor
    p = layout_of(tensor)
    full = tensor.full_tensor()
    if p is None or not p.packed:
        return full
    return to_checkpoint_order(full, p, tensor.device_mesh.size())


# --------------------------------------------------------------------------- family plans


def decoder_plan(
    prefix: str,
    *,
    fused_qkv: bool = False,
    fused_gate_up: bool = False,
    qk_norm: str | None = None,
    mlp_name: str = "mlp",
    lm_head: bool = False,
):
    """`ArchSpec.tp_plan` of a rotary decoder family (`fmodel.models.decoder`): attention split
    by whole heads (q/k/v colwise or qkv_proj packed by heads, o_proj rowwise; a q/k norm over
    the whole projection split with it), the gated MLP colwise then rowwise, each expert of a
    mixture the same (the router replicated), the input embeddings vocab-parallel and the LM
    head colwise_rep. `prefix` is "model." for the head class, "" for the base model."""

    def plan(config) -> dict[str, str]:
        layer = f"{prefix}layers.*."
        attn = layer + "self_attn."
        out: dict[str, str] = {}
        if fused_qkv:
            h, kv = config.num_attention_heads, config.kv_heads
            out[attn + "qkv_proj"] = f"packed_colwise:{h},{kv},{kv}"
        else:
            out.update({attn + "q_proj": "colwise", attn + "k_proj": "colwise", attn + "v_proj": "colwise"})
        out[attn + "o_proj"] = "rowwise"
        if qk_norm == "projection":
            out.update({attn + "q_norm": "colwise", attn + "k_norm": "colwise"})
        mlp = layer + mlp_name + "."
        for block in (mlp, mlp + "experts.*."):
            if fused_gate_up:
                out[block + "gate_up_proj"] = "packed_colwise:1,1"
            else:
                out.update({block + "gate_proj": "colwise", block + "up_proj": "colwise"})
            out[block + "down_proj"] = "rowwise"
        out.update(
            {
                mlp + "experts.*.w1": "colwise",
                mlp + "experts.*.w3": "colwise",
                mlp + "experts.*.w2": "rowwise",
            }
        )
        out[prefix + "embed_tokens"] = "embedding"
        if lm_head:
            out["lm_head"] = "colwise_rep"
        return out

    return plan


def gpt2_plan(prefix: str, *, lm_head: bool = False):
    """`ArchSpec.tp_plan` of GPT-2 (Conv1D weights [in, out]): c_attn packed by heads over its
    q | k | v thirds, the attention's c_proj rowwise, the MLP's c_fc colwise and c_proj rowwise,
    wte vocab-parallel, lm_head (tied to wte) colwise_rep."""

    def plan(config) -> dict[str, str]:
        layer = f"{prefix}h.*."
        out = {
            layer + "attn.c_attn": "conv1d_packed_colwise:1,1,1",
            layer + "attn.c_proj": "conv1d_rowwise",
            layer + "mlp.c_fc": "conv1d_colwise",
            layer + "mlp.c_proj": "conv1d_rowwise",
            prefix + "wte": "embedding",
        }
        if lm_head:
            out["lm_head"] = "colwise_rep"
        return out

    return plan


def bert_plan(prefix: str):
    """`ArchSpec.tp_plan` of BERT: query / key / value colwise, the attention's output dense
    rowwise, the intermediate dense colwise and the output dense rowwise; embeddings, pooler
    and heads replicated."""

    def plan(config) -> dict[str, str]:
        layer = f"{prefix}encoder.layer.*."
        return {
            layer + "attention.self.query": "colwise",
            layer + "attention.self.key": "colwise",
            layer + "attention.self.value": "colwise",
            layer + "attention.output.dense": "rowwise",
            layer + "intermediate.dense": "colwise",
            layer + "output.dense": "rowwise",
        }

    return plan
