"""Sharded loading and saving of distributed states (fmodel.distributed.load_sharded /
save_sharded), on 2 and 4 spawned gloo ranks (CPU).

Each spawn checks several things at once (a rank costs seconds to start):
- `fmodel.load(path, mesh=mesh)` equals `fmodel.distribute(fmodel.load(path), mesh)` tensor for
  tensor (placements, layouts, local values, ties) for a single safetensors file, a sharded one
  with its index, a hub-cache snapshot, a pickle `.bin` and a GGUF file (both loaded whole, then
  distributed), Phi-3's packed qkv_proj / gate_up_proj, a tied head, and dtype=bfloat16;
- each rank's loaded bytes are exactly its share of the sharded tensors plus the replicated
  ones (arithmetic from the plan), every shard owns memory of its own size, and the rank's peak
  RSS growth over the load of a larger checkpoint stays under that share plus a small slack,
  far below the whole model;
- `fmodel.save` called on every rank returns on every rank with the checkpoint written; it
  reloads in Transformers and in a single fmodel process equal to the original;
- the named errors reach every rank: a 2-D mesh (MeshSizeError), heads the mesh size does not
  divide (PlanDivisibilityError), a writer failing mid-save (its OSError on every rank, nothing
  left behind), a save into a file (CheckpointError).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import fmodel

from .conftest import make_hf_model, requires_transformers
from .distributed_io_ranks import four_ranks, spawn, two_ranks
from .families import tiny_hf_model
from .test_hub_cache import cache_repo

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

pytestmark = [pytest.mark.usefixtures("one_thread"), requires_transformers]

REPO = "tiny-org/tp-llama"
COMMIT = "c" * 40
MLP_ONLY = {
    "model.layers.*.mlp.gate_proj": "colwise",
    "model.layers.*.mlp.up_proj": "colwise",
    "model.layers.*.mlp.down_proj": "rowwise",
}
SLACK = 6 * 2**20  # bytes of peak RSS a load may grow beyond its tensors (Python objects, skeleton)


def _save_hf(model, folder: Path, **kwargs) -> str:
    model.save_pretrained(folder, **kwargs)
    return str(folder)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{label: path} of the checkpoints the ranks load, and the Transformers models behind them."""
    root = tmp_path_factory.mktemp("tp-io")
    llama = make_hf_model("llama", num_attention_heads=8, num_key_value_heads=4, intermediate_size=128)
    tied = make_hf_model(
        "llama", seed=1, num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True
    )
    phi3 = tiny_hf_model("phi3", num_attention_heads=8, num_key_value_heads=4, hidden_size=64)
    paths = {
        "single": _save_hf(llama, root / "single"),
        "sharded": _save_hf(llama, root / "sharded", max_shard_size="20KB"),
        "bin": _save_hf(llama, root / "bin", safe_serialization=False),
        "tied": _save_hf(tied, root / "tied"),
        "phi3": _save_hf(phi3, root / "phi3"),
    }
    assert (root / "sharded" / "model.safetensors.index.json").exists()
    cache = root / "cache"
    cache_repo(cache, REPO, root / "single", COMMIT)
    gguf = pytest.importorskip("gguf")
    del gguf
    from .test_gguf import _write

    paths["gguf"] = _write(root / "llama.gguf", llama, "F32")
    big = fmodel.LlamaConfig(  # tied: the shared table must be read once
        vocab_size=16384,
        tie_word_embeddings=True,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    state, _ = fmodel.io.state_from_tensors(big, {}, allow_missing=True, warn_missing=False)
    paths["big"] = fmodel.save(state, root / "big")
    return cache, paths, {"llama": llama, "tied": tied, "phi3": phi3}


def _cases(paths, cache) -> list[tuple[str, str, dict]]:
    return [
        ("single", paths["single"], {}),
        ("phi3", paths["phi3"], {}),
        ("sharded", paths["sharded"], {}),
        ("hub", REPO, {"cache_dir": str(cache), "local_files_only": True}),
        ("tied", paths["tied"], {}),
        ("bf16", paths["single"], {"dtype": "bfloat16"}),
        ("bin", paths["bin"], {}),
        ("gguf", paths["gguf"], {}),
        ("mlp-only", paths["single"], {"plan": MLP_ONLY}),
    ]


def _check_bytes(results: list[dict], world: int) -> None:
    for rank, by_label in enumerate(results):
        for label, m in by_label.items():
            assert m["compared"] > 0, label
            assert m["loaded_bytes"] == m["sharded"] + m["replicated"], (rank, label, m)
            assert m["sharded"] * world == m["full_sharded"], (label, m)
            if label not in ("bin", "gguf"):  # those load whole, then split
                assert m["not_own_memory"] == [], (label, m)


def _check_memory(results: list[dict], world: int) -> None:
    for rank, m in enumerate(results):
        total = m["full_sharded"] + m["replicated"]
        assert m["loaded_bytes"] == m["sharded"] + m["replicated"]
        assert m["sharded"] * world == m["full_sharded"]
        assert m["not_own_memory"] == []
        if m["peak_exact"]:  # VmHWM could be reset: the load's own peak
            assert m["peak_rss_growth"] <= m["loaded_bytes"] + SLACK, (rank, m)
            assert m["peak_rss_growth"] < total * 0.75, (rank, m)


def _check_saved(saved: str, hf_model, source: str) -> None:
    import transformers

    reloaded = type(hf_model).from_pretrained(saved).eval()
    want = hf_model.state_dict()
    got = reloaded.state_dict()
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, hf_model(ids).logits)
    single = fmodel.load(saved)
    original = fmodel.load(source)
    assert sorted(single.tensors) == sorted(original.tensors)
    for name, tensor in original.tensors.items():
        assert torch.equal(single.tensors[name], tensor), name
    assert isinstance(reloaded, transformers.PreTrainedModel)


@pytest.fixture(scope="module")
def gqa_4_2(tmp_path_factory):
    """A checkpoint with 4 heads and 2 kv heads: 4 ranks do not divide its kv heads."""
    return _save_hf(make_hf_model("llama", seed=2), tmp_path_factory.mktemp("gqa") / "ckpt")


def test_two_ranks(checkpoints, gqa_4_2, tmp_path):
    cache, paths, models = checkpoints
    folder = tmp_path / "errors"
    folder.mkdir()
    save_to = tmp_path / "saved-llama"
    results = spawn(
        two_ranks, tmp_path, paths["big"], _cases(paths, cache), str(save_to), paths["single"], str(folder),
        world=2,
    )  # fmt: skip
    _check_memory([r["memory"] for r in results], 2)
    _check_bytes([r["loads"] for r in results], 2)
    for r in results:
        assert r["loads"]["single"]["saved"] == str(save_to)
        assert "model.safetensors" in r["loads"]["single"]["saved_files"]
        errors = r["errors"]
        assert "1-D" in errors["2-D mesh"]
        assert "No space left on device (test)" in errors["writer"] and errors["writer"].startswith("OSError")
        assert errors["after writer"] == "[]"  # the failed save left nothing behind
        assert "not a folder" in errors["file"]
    _check_saved(str(save_to), models["llama"], paths["single"])


def test_four_ranks(checkpoints, gqa_4_2, tmp_path):
    cache, paths, models = checkpoints
    save_to = tmp_path / "saved-phi3"
    cases = [c for c in _cases(paths, cache) if c[0] in ("phi3", "single", "sharded", "hub", "tied", "gguf")]
    cases.sort(key=lambda c: c[0] != "phi3")  # the first case is the one saved
    results = spawn(four_ranks, tmp_path, paths["big"], cases, str(save_to), gqa_4_2, world=4)
    _check_memory([r["memory"] for r in results], 4)
    _check_bytes([r["loads"] for r in results], 4)
    for r in results:
        assert "key/value heads" in r["heads"] and "2" in r["heads"]
        assert r["loads"]["phi3"]["saved"] == str(save_to)
        assert "model.safetensors.index.json" in r["loads"]["phi3"]["saved_files"]
    _check_saved(str(save_to), models["phi3"], paths["phi3"])
    shutil.rmtree(save_to)
