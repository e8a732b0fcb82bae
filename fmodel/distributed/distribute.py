"""`fmodel.distribute(state, mesh, plan=None)`: a tensor-parallel state, and the forward that runs it.

A distributed state is an ordinary `ModelState` whose tensors are DTensors
(`torch.distributed.tensor`) on a 1-D device mesh: the tensors the plan
(`fmodel.distributed.plan`; default the architecture's `ArchSpec.tp_plan`) splits are
`Shard(dim)`, with this rank's slice as local tensor, the rest `Replicate()`.

Mechanism: local shards and explicit collectives. `fmodel.forward` / `generate` /
`bind_forward` on a distributed state run `functional_call` with each DTensor's local tensor
on a *tensor-parallel skeleton*: a copy of the meta skeleton, cached per (config,
architecture, training, mesh, plan), in which
- the attention modules carry their rank's head counts (heads / world, kv heads / world), so
  they reshape the local q/k/v into whole local heads and the KV cache holds local kv heads;
- a "rowwise" linear computes x_local @ W_local^T, sums it over the ranks (one all-reduce) and
  then adds its bias once; the experts of a mixture skip their own all-reduce and the sparse
  block sums its output once instead (the routing is replicated, the experts have no bias);
- a "colwise_rep" head (the LM head) gathers its slices of the logits from every rank;
- a vocab-parallel "embedding" looks up the ids of its range and sums the ranks' rows;
- a norm split with a projection (OLMo 2's q/k norm over the whole projection) sums the
  squares over the ranks before normalising;
- attention weights (`output_attentions`) are gathered over the heads;
- with gradients, the collectives are Megatron's: a split layer's replicated input sums its
  gradient over the ranks in the backward, an all-reduced output passes its gradient through,
  a gathered output keeps this rank's slice of it; without gradients none of that runs.
So every output is a plain, replicated `torch.Tensor` on every rank. Each layer costs two
all-reduces of the activations [B, T, hidden] (after o_proj and after down_proj), the
embedding one, the head one all-gather of the logits. On CPU with gloo that latency is the
step: measured on this project's shared 2-core machines (one gloo all-reduce of a decode
step's [1, 1, 64] ~0.8 ms there), greedy decode of a 2-layer hidden-64 Llama took 5.7 ms per
token at 2 ranks against 0.42 ms in one process, of a 4-layer hidden-256 one 12.2 against 1.7;
the arithmetic per rank is divided by the mesh size, the collectives are what a GPU mesh
(NCCL, microseconds each) makes cheap.

Why not torch's ParallelStyles (`parallelize_module` with ColwiseParallel / RowwiseParallel) on
the skeleton: they run every op of a layer through DTensor's dispatcher (sharding propagation,
redistribute), several times the cost of the op itself for a small decode step on CPU, and
fused projections (Phi-3's qkv_proj, GPT-2's c_attn) would need a custom style anyway. Running
the local tensors through the same modules with a few kinds of module swapped costs what the
collectives cost and nothing more; an undistributed state never reaches this module (the
forward checks one dict before anything else).
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_state, describe
from ..errors import (
    ArgumentTypeError,
    DistributedError,
    MeshSizeError,
    PlanDivisibilityError,
    PlanError,
    StateDistributedError,
)
from ..models.spec import get_spec
from ..state import ModelState
from . import plan as tp

__all__ = [
    "distribute",
    "is_distributed",
    "local_kv_heads",
    "local_tensors",
    "mesh_of",
    "register_plan",
    "state_plan",
    "tp_skeleton",
    "tp_world",
]


# --------------------------------------------------------------------------- collectives


def _group(mesh):
    return mesh.get_group()


def _wants_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


class _Reduce(torch.autograd.Function):
    """Sum over the ranks in the forward; the backward is the identity (Megatron's "g": the
    output is replicated, so is its gradient) unless `both` (the gradient is partial: summed)."""

    @staticmethod
    def forward(ctx, x, group, both):
        import torch.distributed as dist

        ctx.group, ctx.both = group, both
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        if ctx.both:
            grad = _Reduce.apply(grad, ctx.group, True)
        return grad, None, None


class _CopyIn(torch.autograd.Function):
    """The identity in the forward; the backward sums the gradient over the ranks (Megatron's
    "f": a replicated input to a split layer gets a partial gradient on each rank)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _Reduce.apply(grad, ctx.group, False), None


class _Gather(torch.autograd.Function):
    """Every rank's x concatenated along `dim` in rank order (`sizes` when uneven); the backward
    keeps this rank's slice of the (replicated) gradient."""

    @staticmethod
    def forward(ctx, x, dim, group, sizes):
        import torch.distributed as dist

        world, rank = dist.get_world_size(group), dist.get_rank(group)
        dim = dim % x.dim()
        sizes = sizes or [x.shape[dim]] * world
        ctx.dim, ctx.start, ctx.size = dim, sum(sizes[:rank]), x.shape[dim]
        pad = max(sizes) - x.shape[dim]
        if pad:
            x = torch.cat([x, x.new_zeros(*x.shape[:dim], pad, *x.shape[dim + 1 :])], dim=dim)
        x = x.contiguous()
        pieces = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(pieces, x, group=group)
        return torch.cat([p.narrow(dim, 0, n) for p, n in zip(pieces, sizes, strict=True)], dim=dim)

    @staticmethod
    def backward(ctx, grad):
        return grad.narrow(ctx.dim, ctx.start, ctx.size), None, None, None


def _all_reduce(x: torch.Tensor, group, grad_partial: bool = False) -> torch.Tensor:
    """Sum over the ranks. Without gradients in place (no copy); with them through `_Reduce`."""
    if _wants_grad(x):
        return _Reduce.apply(x, group, grad_partial)
    import torch.distributed as dist

    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _copy_in(x: torch.Tensor, group) -> torch.Tensor:
    return _CopyIn.apply(x, group) if _wants_grad(x) else x


def _all_gather(x: torch.Tensor, dim: int, group, sizes: list[int] | None = None) -> torch.Tensor:
    """Every rank's `x` concatenated along `dim` in rank order; `sizes` (per rank, along dim)
    when they differ (padded to the largest for the collective)."""
    return _Gather.apply(x, dim, group, sizes)


# --------------------------------------------------------------------------- swapped modules


class _TP:
    """Mixin data of a swapped module: the process group, world size and rank."""

    tp_group: Any
    tp_world: int
    tp_rank: int


def _linear_no_bias(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if getattr(module, "tp_conv1d", False):  # GPT-2 Conv1D: weight [in, out]
        return x @ module.weight
    return F.linear(x, module.weight)


def _rowwise_forward(self, x: torch.Tensor) -> torch.Tensor:
    out = _linear_no_bias(self, x)
    if not self.tp_partial:
        out = _all_reduce(out, self.tp_group)
    return out if self.bias is None else out + self.bias


def _colwise_forward(self, x: torch.Tensor) -> torch.Tensor:
    return super(type(self), self).forward(_copy_in(x, self.tp_group))


def _colwise_rep_forward(self, x: torch.Tensor) -> torch.Tensor:
    out = _linear_no_bias(self, _copy_in(x, self.tp_group))
    if self.bias is not None:
        out = out + self.bias
    return _all_gather(out, -1, self.tp_group, self.tp_sizes)


def _embedding_forward(self, ids: torch.Tensor) -> torch.Tensor:
    lo, n = self.tp_start, self.weight.shape[0]
    local = ids - lo
    outside = (local < 0) | (local >= n)
    if n == 0:
        out = self.weight.new_zeros(*ids.shape, self.weight.shape[1])
    else:
        # the class's own lookup (Gemma 3's scales its rows) over this rank's rows
        out = super(type(self), self).forward(local.masked_fill(outside, 0))
        out = out.masked_fill(outside.unsqueeze(-1), 0)
    return _all_reduce(out, self.tp_group)


def _split_rms_forward(self, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm over a dim split across the ranks: the sum of squares is summed over them."""
    dtype = x.dtype
    h = x.to(torch.float32)
    # each rank's outputs depend on the total: its gradient is partial, summed in the backward
    squares = _all_reduce(h.pow(2).sum(-1, keepdim=True), self.tp_group, grad_partial=True)
    h = h * torch.rsqrt(squares / self.tp_full + self.eps)
    return self.weight * (h if dtype == torch.float32 else h.to(dtype))


def _moe_forward(self, hidden: torch.Tensor):
    """`SparseMoeBlock.forward` whose experts return partial sums (their down projections are
    split on the input features), summed once over the ranks. The routing is replicated; its
    weights multiply partial outputs, so their gradient is partial and summed in the backward."""
    from ..models.moe import dispatch_experts, route

    b, t, c = hidden.shape
    if self.training and self.jitter_noise > 0:
        noise = torch.empty_like(hidden).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        hidden = hidden * noise
    x = hidden.reshape(-1, c)
    router_logits = self.gate(x)
    weights, selected = route(router_logits, self.top_k, self.renormalise, x.dtype)
    weights = _copy_in(weights, self.tp_group)
    out = dispatch_experts(x, weights, selected, self.experts).view(b, t, c)
    return _all_reduce(out, self.tp_group), router_logits


def _root_forward(self, *args: Any, **kwargs: Any):
    out = super(type(self), self).forward(*args, **kwargs)
    attentions = out.get("attentions") if isinstance(out, dict) else None
    if attentions:
        out = dict(out)
        out["attentions"] = tuple(None if a is None else _all_gather(a, 1, self.tp_group) for a in attentions)
    return out


_SUBCLASSES: dict[tuple[type, str], type] = {}


def _swap(module: nn.Module, kind: str, forward, **attributes: Any) -> None:
    """Give `module` a subclass of its class whose forward is `forward`, and `attributes`."""
    cls = type(module)
    key = (cls, kind)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(cls.__name__, (_TP, cls), {"forward": forward, "tp_kind": kind})
    module.__class__ = _SUBCLASSES[key]
    for name, value in attributes.items():
        object.__setattr__(module, name, value)


def _is_norm(module: nn.Module) -> bool:
    from ..models.norms import RMSNorm

    return isinstance(module, RMSNorm)


def _attention_counts(module: nn.Module, world: int) -> None:
    """Local head counts of an attention module whose projections are split by whole heads."""
    if getattr(module, "num_heads", None) is None:
        return  # a fused gate_up_proj's MLP
    for count in ("num_heads", "num_key_value_heads", "q_size", "kv_size"):
        if isinstance(getattr(module, count, None), int):
            setattr(module, count, getattr(module, count) // world)


_SKELETONS: dict[tuple, nn.Module] = {}
_LOCK = threading.Lock()


def tp_skeleton(state: ModelState, training: bool = False) -> nn.Module:
    """The tensor-parallel skeleton of a distributed `state` (see the module docstring), cached
    per (config, architecture, training, mesh, plan); run it with `local_tensors(state)`."""
    mesh = mesh_of(state)
    if mesh is None:
        raise StateDistributedError("tp_skeleton: the state is not distributed (see fmodel.distribute)")
    plan = _state_plan(state)
    # the group's id too: a mesh equal to an earlier one over a re-created process group must not
    # reuse that group (the cached skeleton holds its group, so the id is not reused meanwhile)
    key = (state.config, state.architecture, training, mesh, id(_group(mesh)), tuple(plan.items()))
    module = _SKELETONS.get(key)
    if module is None:
        with _LOCK:
            module = _SKELETONS.get(key)
            if module is None:
                module = _SKELETONS[key] = _build_tp_skeleton(state, mesh, plan, training)
    return module


def _build_tp_skeleton(state: ModelState, mesh, plan: Mapping[str, str], training: bool) -> nn.Module:
    from ..models.moe import SparseMoeBlock
    from ..models.skeleton import skeleton

    module = copy.deepcopy(skeleton(state.config, state.architecture, training))
    group, world, rank = _group(mesh), mesh.size(), mesh.get_local_rank()
    common = dict(tp_group=group, tp_world=world, tp_rank=rank)
    modules = dict(module.named_modules())
    styles = tp.match_plan(modules, plan)
    split_attention = set()
    for name, style in styles.items():
        sub, s = modules[name], tp.parse_style(style)
        parent = name.rpartition(".")[0]
        conv1d = dict(tp_conv1d=s.conv1d)
        if s.kind in ("colwise", "packed_colwise"):
            if _is_norm(sub):
                _swap(sub, "split_norm", _split_rms_forward, tp_full=sub.weight.shape[0], **common)
            else:
                _swap(sub, "colwise", _colwise_forward, **common)
                if (s.kind == "colwise" and name.endswith(("q_proj", "query"))) or s.kind == "packed_colwise":
                    split_attention.add(parent)
        elif s.kind == "rowwise":
            in_expert = any(
                isinstance(modules.get(p), SparseMoeBlock) and name.startswith(p + ".experts.")
                for p in _ancestors(name)
            )
            _swap(sub, "rowwise", _rowwise_forward, tp_partial=in_expert, **conv1d, **common)
        elif s.kind == "colwise_rep":
            sizes = [hi - lo for lo, hi in tp.chunk_ranges(sub.weight.shape[0], world)]
            _swap(sub, "colwise_rep", _colwise_rep_forward, tp_sizes=sizes, **conv1d, **common)
        elif s.kind == "embedding":
            start = tp.chunk_ranges(sub.weight.shape[0], world)[rank][0]
            _swap(sub, "embedding", _embedding_forward, tp_start=start, **common)
    for name in split_attention:
        if name in modules:
            _attention_counts(modules[name], world)
    for name, sub in modules.items():
        if isinstance(sub, SparseMoeBlock) and any(
            styles.get(n) and tp.parse_style(styles[n]).kind == "rowwise"
            for n in styles
            if n.startswith(name + ".experts.")
        ):
            _swap(sub, "moe", _moe_forward, **common)
    _swap(module, "root", _root_forward, **common)
    return module


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


# --------------------------------------------------------------------------- state queries

_PLANS = tp.IdentityWeakMap()  # input-embedding DTensor -> the plan it was distributed with


def _plans() -> tp.IdentityWeakMap:
    return _PLANS


def mesh_of(state: ModelState):
    """The device mesh of a distributed state (made by `distribute` or a sharded load), else None.
    Cheap when nothing was ever distributed in this process."""
    if not tp._LAYOUTS:
        return None
    params = getattr(state, "params", None)
    t = None if params is None else params.get(get_spec(state.architecture).input_embeddings)
    if t is None or tp.layout_of(t) is None:
        return None
    return t.device_mesh


def is_distributed(state: ModelState) -> bool:
    """True when `state` is tensor-parallel (its tensors are DTensors from `distribute`)."""
    return mesh_of(state) is not None


def local_kv_heads(state: ModelState) -> dict[int, int] | None:
    """{layer index: the key/value heads this rank's cache holds} for a distributed state (its
    tensor-parallel skeleton's attention modules: local counts where the plan splits attention,
    all heads where it replicates it), None for a state that is not distributed."""
    if mesh_of(state) is None:
        return None
    skeleton_ = tp_skeleton(state)
    counts = skeleton_.__dict__.get("_local_kv_heads")  # computed once per cached skeleton
    if counts is None:  # (the cache is checked on every cached forward step)
        counts = {}
        for module in skeleton_.modules():
            layer, heads = getattr(module, "layer_idx", None), getattr(module, "num_heads", None)
            if isinstance(layer, int) and isinstance(heads, int) and hasattr(module, "head_dim"):
                counts[layer] = getattr(module, "num_key_value_heads", heads)
        skeleton_.__dict__["_local_kv_heads"] = counts
    return counts


def tp_world(state: ModelState) -> int:
    """The mesh size of a distributed state, 1 for any other."""
    mesh = mesh_of(state)
    return 1 if mesh is None else mesh.size()


def _state_plan(state: ModelState) -> Mapping[str, str]:
    t = state.params[get_spec(state.architecture).input_embeddings]
    plan = _plans().get(t)
    if plan is None:
        spec = get_spec(state.architecture)
        plan = spec.tp_plan(state.config) if spec.tp_plan is not None else {}
    return plan


def state_plan(state: ModelState) -> Mapping[str, str]:
    """The plan a distributed `state` was split by (its architecture's default unless a custom
    one was recorded by `distribute` or `register_plan`)."""
    return _state_plan(state)


def register_plan(state: ModelState, plan: Mapping[str, str]) -> None:
    """Record that distributed `state` was split by `plan` (not its architecture's default): for
    sharded loaders that take a custom plan. `distribute` records it itself."""
    _plans()[state.params[get_spec(state.architecture).input_embeddings]] = dict(plan)


def local_tensors(state: ModelState) -> dict[str, torch.Tensor]:
    """Every tensor of the state (aliases included) as this rank's local tensor."""
    from torch.distributed.tensor import DTensor

    return {n: t.to_local() if isinstance(t, DTensor) else t for n, t in state.tensors.items()}


# --------------------------------------------------------------------------- distribute


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _sharded_sizes(config, styles: Mapping[str, str]) -> list[tuple[str, int]]:
    """(what, size) of the config sizes the plan splits, for a message that names them."""
    kinds = {tp.parse_style(s).kind for s in styles.values()}
    names = " ".join(styles)
    out: list[tuple[str, int]] = []
    splits_attention = any(k in names for k in ("q_proj", "qkv_proj", "c_attn", "attention.self.query"))
    if splits_attention:
        heads = getattr(config, "num_attention_heads", None)
        if heads:
            out.append(("attention heads (num_attention_heads)", heads))
        kv = getattr(config, "kv_heads", None)
        if kv and kv != heads:
            out.append(("key/value heads (num_key_value_heads)", kv))
    if "rowwise" in kinds or "colwise" in kinds or "packed_colwise" in kinds:
        moe = getattr(config, "moe_experts", None)
        if moe and "experts" in names:
            out.append(("the experts' FFN width (moe_intermediate_size)", config.moe_intermediate))
        ffn = getattr(config, "intermediate_size", None)
        if ffn and any(
            k in names
            for k in ("mlp.gate_proj", "mlp.gate_up_proj", "c_fc", "intermediate.dense", "mlp.up_proj")
        ):
            out.append(("the FFN width (intermediate_size)", ffn))
    return out


def distribute(state: ModelState, mesh, plan: Mapping[str, str] | None = None) -> ModelState:
    """A tensor-parallel copy of `state` over the 1-D device `mesh`: its tensors are DTensors,
    split by `plan` (default the architecture's `ArchSpec.tp_plan(config)`; the format is
    `fmodel.distributed.plan`'s) and replicated elsewhere. Call it on every rank with the same
    state (same seed or the same checkpoint). `fmodel.forward`, `generate`, `bind_forward` and
    `init_cache` take the result and give the single-process outputs, as plain tensors, on
    every rank.

    Pure: `state` is unchanged; replicated DTensors share its tensors' storage, split ones hold
    a copy of this rank's slice only.

    Raises:
        ArgumentTypeError: `state` is not a ModelState, `mesh` not a DeviceMesh, `plan` not a mapping.
        MeshSizeError: the mesh is not 1-D, or its size is not the world size.
        StateDistributedError: the state is already distributed.
        PlanDivisibilityError: the mesh size does not divide the heads, kv heads or FFN width
            the plan splits (the message names it and the sizes that work).
        PlanError: a key of the given plan matches no module, or a style is unknown.
        DistributedError: no plan for this architecture, a quantized state, or pruned heads.
    """
    check_state(state, "distribute(state)")
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor

    if not isinstance(mesh, DeviceMesh):
        raise ArgumentTypeError(
            f"distribute(mesh) must be a torch.distributed.device_mesh.DeviceMesh (init_device_mesh('cpu', "
            f"(world_size,))), got {describe(mesh)}"
        )
    if mesh.ndim != 1:
        raise MeshSizeError(
            f"distribute(mesh): tensor parallelism takes a 1-D mesh, got {mesh.ndim}-D {mesh}"
        )
    world = mesh.size()
    if not dist.is_initialized() or dist.get_world_size() != world:
        got = dist.get_world_size() if dist.is_initialized() else "no process group"
        raise MeshSizeError(
            f"distribute(mesh): the mesh has {world} ranks but the world size is {got}; "
            f"make the mesh over every rank: init_device_mesh(device_type, ({got},))"
        )
    if any(isinstance(t, DTensor) for t in state.tensors.values()):
        raise StateDistributedError(
            "distribute(state): the state is already distributed (its tensors are DTensors); "
            "distribute the undistributed state, or use this one as it is"
        )
    if plan is not None and not isinstance(plan, Mapping):
        raise ArgumentTypeError(
            f"distribute(plan) must be a mapping of module pattern to style, got {describe(plan)}"
        )
    from ..transforms.quantize import is_quantized

    if is_quantized(state):
        raise DistributedError(
            "distribute(state): a quantized state cannot be distributed (its packed integer weights and "
            "scales are not split by the plan); distribute the float state, or dequantize first"
        )
    if any(state.config.pruned_heads.values()) if hasattr(state.config, "pruned_heads") else False:
        raise DistributedError(
            "distribute(state): the state has pruned heads (config.pruned_heads), so its layers differ "
            "in head count and one plan cannot split them; distribute an unpruned state"
        )
    spec = get_spec(state.architecture)
    skel_modules = _module_names(state)
    if plan is None:
        if spec.tp_plan is None:
            raise DistributedError(
                f"distribute: {state.architecture} has no tensor-parallel plan (ArchSpec.tp_plan); "
                "pass plan={module pattern: style}"
            )
        plan = dict(spec.tp_plan(state.config))
    else:
        plan = dict(plan)
        unmatched = tp.unmatched_keys(skel_modules, plan)
        if unmatched:
            raise PlanError(
                f"distribute(plan): keys {unmatched} match no module of {state.architecture} "
                f"(module names look like {skel_modules[1:4]}; '*' stands for one dotted component)"
            )
    styles = tp.match_plan(skel_modules, plan)
    sizes = _sharded_sizes(state.config, styles)
    bad = [(what, n) for what, n in sizes if n % world]
    if bad:
        common = math.gcd(*(n for _, n in sizes))
        raise PlanDivisibilityError(
            f"distribute: the mesh size {world} does not divide "
            + ", ".join(f"the {n} {what}" for what, n in bad)
            + f"; mesh sizes that work for this model: {_divisors(common)}"
        )
    rank = mesh.get_local_rank()
    made: dict[int, torch.Tensor] = {}

    def convert(name: str, t: torch.Tensor) -> torch.Tensor:
        if id(t) in made:  # a tie: the alias is the source's DTensor
            return made[id(t)]
        p = tp.placement(name, t.shape, plan)
        local = t if p.dim is None else tp.local_shard(t, name, plan, world, rank).clone()
        out = made[id(t)] = tp.to_dtensor(local, p, mesh, t.shape)
        return out

    # sources before aliases, so a tie's placement is its source's
    ties = dict(state.ties)
    order = [n for n in state.params if n not in ties] + [n for n in state.params if n in ties]
    params = {n: convert(n, state.params[n]) for n in order}
    params = {n: params[n] for n in state.params}
    buffers = {n: convert(n, t) for n, t in state.buffers.items()}
    out = state.replace(params=params, buffers=buffers)
    _plans()[out.params[spec.input_embeddings]] = plan
    return out


def _module_names(state: ModelState) -> list[str]:
    from ..models.skeleton import skeleton

    return [n for n, _ in skeleton(state.config, state.architecture).named_modules()]
