"""Tensor-parallel plans (fmodel.distributed.plan): styles, placements and slices, without processes."""

from __future__ import annotations

import pytest
import torch

from fmodel.distributed import plan as tp
from fmodel.errors import PlanDivisibilityError, PlanError
from fmodel.models import ARCHITECTURES
from fmodel.models.skeleton import skeleton

from .families import tiny_config

PLAN = {
    "model.layers.*.self_attn.q_proj": "colwise",
    "model.layers.*.self_attn.o_proj": "rowwise",
    "model.layers.*.self_attn.qkv_proj": "packed_colwise:4,2,2",
    "transformer.h.*.attn.c_attn": "conv1d_packed_colwise:1,1,1",
    "transformer.h.*.mlp.c_proj": "conv1d_rowwise",
    "lm_head": "colwise_rep",
    "model.embed_tokens": "embedding",
}


def test_parse_style():
    assert tp.parse_style("colwise") == tp.Style("colwise")
    assert tp.parse_style("conv1d_packed_colwise:1,1,1") == tp.Style("packed_colwise", True, (1, 1, 1))
    for bad in ("columnwise", "packed_colwise", "packed_colwise:0,1", "colwise:2", "conv1d_embedding", 3):
        with pytest.raises(PlanError):
            tp.parse_style(bad)


def test_star_is_one_component():
    assert tp.module_style("model.layers.11.self_attn.q_proj", PLAN) == "colwise"
    assert tp.module_style("model.layers.1.2.self_attn.q_proj", PLAN) is None
    assert tp.module_style("model.layers.1.self_attn.q_proj_extra", PLAN) is None
    assert tp.unmatched_keys(
        ["lm_head", "model.layers.0.self_attn.q_proj"], {"lm_head": "colwise", "x.*": "rowwise"}
    ) == ["x.*"]


def test_placements():
    p = tp.placement("model.layers.0.self_attn.q_proj.weight", (32, 16), PLAN)
    assert (p.dim, p.sections, p.kind) == (0, (32,), "colwise")
    assert tp.placement("model.layers.0.self_attn.q_proj.bias", (32,), PLAN).dim == 0
    assert tp.placement("model.layers.0.self_attn.o_proj.weight", (16, 32), PLAN).dim == 1
    assert tp.placement("model.layers.0.self_attn.o_proj.bias", (16,), PLAN).dim is None
    assert tp.placement("model.norm.weight", (16,), PLAN).dim is None
    packed = tp.placement("model.layers.0.self_attn.qkv_proj.weight", (64, 16), PLAN)
    assert packed.sections == (32, 16, 16) and packed.packed
    assert packed.ranges(2, 1) == [(16, 32), (40, 48), (56, 64)]
    conv = tp.placement("transformer.h.3.attn.c_attn.weight", (16, 48), PLAN)
    assert (conv.dim, conv.sections) == (1, (16, 16, 16))
    assert tp.placement("transformer.h.3.attn.c_attn.bias", (48,), PLAN).dim == 0
    assert tp.placement("transformer.h.3.mlp.c_proj.weight", (64, 16), PLAN).dim == 0


def test_uneven_only_where_allowed():
    head = tp.placement("lm_head.weight", (7, 4), PLAN)
    assert head.ranges(3, 0) == [(0, 3)] and head.ranges(3, 2) == [(6, 7)]
    assert tp.chunk_ranges(5, 4) == [(0, 2), (2, 4), (4, 5), (5, 5)]
    with pytest.raises(
        PlanDivisibilityError, match=r"not divisible by the mesh size 3.*\[1, 2, 4, 8, 16, 32\]"
    ):
        tp.shard_slice("model.layers.0.self_attn.q_proj.weight", (32, 16), PLAN, 3, 0)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_slices_reassemble(world):
    torch.manual_seed(0)
    for name, shape in [
        ("model.layers.0.self_attn.qkv_proj.weight", (96, 8)),
        ("transformer.h.0.attn.c_attn.weight", (8, 36)),
        ("lm_head.weight", (10, 4)),
        ("model.layers.0.self_attn.o_proj.weight", (8, 12)),
        ("model.norm.weight", (8,)),
    ]:
        full = torch.randn(shape)
        p = tp.placement(name, shape, PLAN)
        locals_ = [tp.local_shard(full, name, PLAN, world, r) for r in range(world)]
        if p.dim is None:
            assert all(t is full for t in locals_)
            continue
        for r, t in enumerate(locals_):
            assert t.shape == p.local_shape(shape, world, r)
        gathered = torch.cat(locals_, dim=p.dim)
        assert torch.equal(tp.to_checkpoint_order(gathered, p, world), full)


def test_packed_rank_holds_whole_heads():
    # q | k | v with 4 query heads and 2 kv heads of width 2: rank 1 of 2 holds q heads 2, 3, k head 1, v head 1
    full = torch.arange(16).repeat_interleave(1).view(16, 1)
    idx = tp.shard_slice("model.layers.0.self_attn.qkv_proj.weight", (16, 1), PLAN, 2, 1)
    local = torch.cat([full[i] for i in idx])
    assert local.flatten().tolist() == [4, 5, 6, 7, 10, 11, 14, 15]


def _families():
    return sorted({s.model_type for s in ARCHITECTURES.values() if s.tp_plan is not None})


@pytest.mark.parametrize("model_type", _families())
def test_family_plans_cover_their_classes(model_type):
    """Every class's plan has only valid styles, shards something, splits each tensor evenly at 2
    ranks (the tiny sizes), and gives tied tensors one placement."""
    config = tiny_config(model_type)
    for spec in ARCHITECTURES.values():
        if spec.model_type != model_type:
            continue
        plan = spec.tp_plan(config)
        module = skeleton(config, spec.name, False)
        matched = tp.match_plan((n for n, _ in module.named_modules()), plan)
        assert matched, spec.name
        shapes = {n: t.shape for n, t in module.state_dict(keep_vars=True).items()}
        sharded = 0
        for name, shape in shapes.items():
            p = tp.placement(name, shape, plan)
            if p.dim is not None:
                sharded += 1
                assert sum(hi - lo for r in range(2) for lo, hi in p.ranges(2, r, name)) == shape[p.dim]
        assert sharded >= 4 * config.num_hidden_layers or model_type == "bert", spec.name
        for alias, source in spec.ties(config).items():
            assert (
                tp.placement(alias, shapes[source], plan).dim
                == tp.placement(source, shapes[source], plan).dim
            )
