"""Tensor parallelism over gloo on CPU: `fmodel.distribute` then forward / generate / bind_forward
equal to the undistributed state's (float32 logits within 1e-5, greedy tokens equal) for every
decoder family and BERT at 2 ranks, Llama at 3 (9 heads, 3 kv heads, as SmolLM2) and 4 ranks,
and the named errors. Each test spawns its ranks once and runs many checks in them."""

from __future__ import annotations

import json

import pytest
import torch

from .spawn_ranks import spawn

TIMEOUT_S = 120


def _suite(rank: int, world: int, suite: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    return SUITES[suite](init_device_mesh("cpu", (world,)))


def _run(suite: str, world: int, tmp_path) -> dict:
    results = spawn(_suite, tmp_path, suite, world=world, timeout=TIMEOUT_S)[0]
    print(json.dumps(results, indent=1))  # the parity numbers, shown with -s or on failure
    return results


# --------------------------------------------------------------------------- in the ranks


def _max_diff(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


def _check_model(
    state, mesh, *, generative: bool = True, attentions: bool = True, bind: bool = True, plan=None
) -> dict:
    """Distributed vs undistributed results of one state (run on every rank)."""
    from torch.distributed.tensor import DTensor

    import fmodel

    torch.manual_seed(0)
    vocab = state.config.vocab_size
    ids = torch.randint(0, vocab, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    before = dict(state.tensors)
    dist_state = fmodel.distribute(state, mesh, plan)
    r: dict = {}
    assert all(isinstance(t, DTensor) for t in dist_state.tensors.values())
    assert all(state.tensors[n] is t for n, t in before.items()), "distribute changed its input"
    assert not any(isinstance(t, DTensor) for t in state.tensors.values())
    ref = fmodel.forward(state, ids, attention_mask=mask, output_hidden_states=True)
    out = fmodel.forward(dist_state, ids, attention_mask=mask, output_hidden_states=True)
    field = "logits" if ref.logits is not None else "last_hidden_state"
    got, want = getattr(out, field), getattr(ref, field)
    r["plain"] = type(got) is torch.Tensor and all(type(h) is torch.Tensor for h in out.hidden_states)
    r["forward"] = _max_diff(got, want)
    r["hidden"] = max(_max_diff(a, b) for a, b in zip(out.hidden_states, ref.hidden_states, strict=True))
    if attentions:
        ref_a = fmodel.forward(state, ids, attention_mask=mask, output_attentions=True)
        out_a = fmodel.forward(dist_state, ids, attention_mask=mask, output_attentions=True)
        r["attentions"] = max(
            _max_diff(a, b) for a, b in zip(out_a.attentions, ref_a.attentions, strict=True)
        )
    if generative:
        kw = dict(max_new_tokens=6, do_sample=False, attention_mask=mask, pad_token_id=0, eos_token_id=None)
        r["generate_equal"] = bool(
            torch.equal(fmodel.generate(state, ids, **kw), fmodel.generate(dist_state, ids, **kw))
        )
        cache = fmodel.init_cache(dist_state, 2, 16)
        r["cache_heads"] = int(cache.keys[0].shape[1])
    if generative and bind:

        def greedy(forward, s):
            out = forward(
                ids, attention_mask=mask, past_key_values=fmodel.init_cache(s, 2, 16), logits_to_keep=1
            )
            tokens, m = [], mask
            for _ in range(4):
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(nxt)
                m = torch.cat([m, torch.ones(2, 1, dtype=m.dtype)], dim=1)
                out = forward(nxt, attention_mask=m, past_key_values=out.past_key_values, logits_to_keep=1)
            return torch.cat(tokens, 1), out.logits

        t_ref, l_ref = fmodel.bind_forward(state, lambda f: greedy(f, state))
        t_out, l_out = fmodel.bind_forward(dist_state, lambda f: greedy(f, dist_state))
        r["bind_equal"] = bool(torch.equal(t_ref, t_out))
        r["bind_logits"] = _max_diff(l_ref, l_out)
    return r


def _check_grads(state, mesh) -> float:
    """Max difference between the gradients of a loss through the distributed forward (each
    rank's local gradient) and the matching slices of the undistributed gradients."""
    import fmodel
    from fmodel.distributed import plan as tp
    from fmodel.distributed.distribute import state_plan

    made: dict[int, torch.Tensor] = {}
    params = {n: made.setdefault(id(t), t.detach().clone().requires_grad_()) for n, t in state.params.items()}
    state = state.replace(params=params)
    torch.manual_seed(1)
    ids = torch.randint(0, state.config.vocab_size, (2, 7))

    def loss(s):
        logits = fmodel.forward(s, ids).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, -2).float(), ids.flatten())

    dist_state = fmodel.distribute(state, mesh)
    want = torch.autograd.grad(loss(state), list(state.unique_params().values()))
    names = list(state.unique_params())
    got = torch.autograd.grad(loss(dist_state), [dist_state.params[n] for n in names])
    plan, world, rank = state_plan(dist_state), mesh.size(), mesh.get_local_rank()
    worst = 0.0
    for name, g, w in zip(names, got, want, strict=True):
        local = tp.local_shard(w, name, plan, world, rank)
        worst = max(worst, _max_diff(g.to_local(), local))
    return worst


def _tiny(model_type: str, **overrides):
    import fmodel
    from tests.families import tiny_config

    config = tiny_config(model_type, **overrides)
    spec_arch = {"bert": "BertForMaskedLM", "gpt2": "GPT2LMHeadModel"}.get(model_type)
    return fmodel.init(config, seed=1, architecture=spec_arch)


def _families(mesh) -> dict:
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    import fmodel
    from fmodel.errors import (
        DistributedError,
        MeshSizeError,
        PlanDivisibilityError,
        PlanError,
        StateDistributedError,
    )

    world = mesh.size()
    results: dict = {}
    gemma = dict(
        sliding_window=4, attn_logit_softcapping=1.0, final_logit_softcapping=5.0, initializer_range=0.1
    )
    models = {
        "llama": _tiny("llama"),
        "llama_tied": _tiny("llama", tie_word_embeddings=True),
        "qwen3": _tiny("qwen3"),
        "olmo2": _tiny("olmo2"),
        "gemma2": _tiny("gemma2", **gemma),
        "gemma3_text": _tiny("gemma3_text", sliding_window=4, sliding_window_pattern=2),
        "olmo": _tiny("olmo", clip_qkv=0.5),
        "phi3": _tiny("phi3"),
        "mixtral": _tiny("mixtral"),
        "qwen3_moe": _tiny("qwen3_moe"),
        "gpt2": _tiny("gpt2", vocab_size=97),  # an odd vocabulary: uneven embedding / head split
    }
    for name, state in models.items():
        results[name] = _check_model(state, mesh, attentions=name in ("llama", "gemma2", "gpt2", "phi3"))
    results["bert"] = _check_model(_tiny("bert"), mesh, generative=False)
    # a plan that splits only the MLP: attention stays whole, so the cache holds every kv head
    mlp_only = {
        "model.layers.*.mlp.gate_proj": "colwise",
        "model.layers.*.mlp.up_proj": "colwise",
        "model.layers.*.mlp.down_proj": "rowwise",
    }
    results["llama_mlp_only"] = _check_model(models["llama"], mesh, attentions=False, plan=mlp_only)
    results["grads"] = {
        name: _check_grads(models[name], mesh) for name in ("llama_tied", "olmo2", "phi3", "mixtral", "gpt2")
    }
    results["grads"]["bert"] = _check_grads(_tiny("bert"), mesh)
    # local shards: q_proj holds whole local heads, o_proj half the input features
    d = fmodel.distribute(models["llama"], mesh)
    q = d.params["model.layers.0.self_attn.q_proj.weight"]
    results["llama_local_q"] = list(q.to_local().shape)
    results["llama_local_o"] = list(d.params["model.layers.0.self_attn.o_proj.weight"].to_local().shape)
    errors = {}
    try:
        fmodel.distribute(d, mesh)
    except StateDistributedError as e:
        errors["already"] = str(e)
    try:
        fmodel.distribute(
            _tiny(
                "llama", num_attention_heads=6, num_key_value_heads=3, hidden_size=48, intermediate_size=48
            ),
            mesh,
        )
    except PlanDivisibilityError as e:
        errors["kv_heads"] = str(e)
    try:
        fmodel.distribute(models["llama"], mesh, plan={"model.layers.*.attn.q_proj": "colwise"})
    except PlanError as e:
        errors["unmatched"] = str(e)
    for key, bad_mesh in (
        ("mesh_size", DeviceMesh("cpu", torch.arange(1))),
        ("mesh_2d", init_device_mesh("cpu", (1, 2))),
    ):
        try:
            fmodel.distribute(models["llama"], bad_mesh)
        except MeshSizeError as e:
            errors[key] = str(e)
    try:
        fmodel.distribute(fmodel.quantize(models["llama"], "int8", group_size=32), mesh)
    except DistributedError as e:
        errors["quantized"] = str(e)
    results["errors"] = errors
    results["world"] = world
    return results


def _llama_only(mesh) -> dict:
    import fmodel
    from fmodel.errors import PlanDivisibilityError

    world = mesh.size()
    if world == 3:  # SmolLM2's head layout: 9 heads, 3 kv heads
        state = _tiny(
            "llama", hidden_size=72, num_attention_heads=9, num_key_value_heads=3, intermediate_size=96
        )
    else:
        state = _tiny(
            "llama", hidden_size=64, num_attention_heads=8, num_key_value_heads=4, intermediate_size=64
        )
    results = {"llama": _check_model(state, mesh, attentions=world == 3)}
    if world == 3:  # the packed qkv_proj at 3 ranks (2 ranks: the families suite)
        results["phi3"] = _check_model(
            _tiny(
                "phi3",
                hidden_size=state.config.hidden_size,
                num_attention_heads=state.config.num_attention_heads,
                num_key_value_heads=state.config.kv_heads,
                intermediate_size=state.config.intermediate_size,
            ),
            mesh,
            attentions=False,
            bind=False,
        )
    try:
        fmodel.distribute(_tiny("llama"), mesh)  # 4 heads, 2 kv heads
    except PlanDivisibilityError as e:
        results["error"] = str(e)
    return results


SUITES = {"families": _families, "llama": _llama_only}


# --------------------------------------------------------------------------- tests


def _assert_parity(name: str, r: dict, kv_heads_local: int | None = None) -> None:
    assert r["plain"], name
    assert r["forward"] <= 1e-5, (name, r)
    assert r["hidden"] <= 1e-5, (name, r)
    if "attentions" in r:
        assert r["attentions"] <= 1e-5, (name, r)
    if "generate_equal" in r:
        assert r["generate_equal"], (name, r)
    if "bind_equal" in r:
        assert r["bind_equal"] and r["bind_logits"] <= 1e-5, (name, r)
    if kv_heads_local is not None:
        assert r["cache_heads"] == kv_heads_local, (name, r)


def test_families_at_two_ranks(tmp_path):
    results = _run("families", 2, tmp_path)
    for name in (
        "llama",
        "llama_tied",
        "qwen3",
        "olmo",
        "olmo2",
        "gemma2",
        "gemma3_text",
        "phi3",
        "mixtral",
        "qwen3_moe",
    ):
        _assert_parity(name, results[name], kv_heads_local=1)
    _assert_parity("gpt2", results["gpt2"], kv_heads_local=2)
    _assert_parity("bert", results["bert"])
    _assert_parity("llama_mlp_only", results["llama_mlp_only"], kv_heads_local=2)
    assert results["llama_local_q"] == [16, 32] and results["llama_local_o"] == [32, 16]
    for name, diff in results["grads"].items():
        assert diff <= 1e-5, (name, diff)
    errors = results["errors"]
    assert "already distributed" in errors["already"]
    assert "3 key/value heads" in errors["kv_heads"] and "[1, 3]" in errors["kv_heads"]
    assert "match no module" in errors["unmatched"]
    assert "the mesh has 1 ranks but the world size is 2" in errors["mesh_size"]
    assert "1-D mesh, got 2-D" in errors["mesh_2d"]
    assert "a quantized state cannot be distributed" in errors["quantized"]


@pytest.mark.parametrize("world", [3, 4])
def test_llama_at_three_and_four_ranks(world, tmp_path):
    results = _run("llama", world, tmp_path)
    _assert_parity("llama", results["llama"], kv_heads_local={3: 1, 4: 1}[world])
    if world == 3:
        _assert_parity("phi3", results["phi3"], kv_heads_local=1)
    assert f"mesh size {world} does not divide" in results["error"]
    assert "[1, 2]" in results["error"]
