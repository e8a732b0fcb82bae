"""The facade under torch.distributed (2 gloo ranks spawned here, CPU): FSDP2 training equal to
one process, a `torch.distributed.checkpoint` save/restore resuming to the same losses, and
`from_pretrained(path, tp_plan="auto")` (spawned ranks and a real `torchrun`).

Comparisons: the single-process run trains on the whole batch; each rank of the sharded run on
its half. A causal LM's loss is the mean over the batch's labelled tokens, which the halves do
not hold equally (labels of -100 are spread unevenly): each rank passes the whole batch's count
as `num_items_in_batch` (its loss is its tokens' share of the global mean) and, as Trainer does
for a model that takes it, backpropagates `loss * world` because FSDP averages the gradients
over ranks; the logged loss is the sum over ranks. BERT's classifier loss is a plain mean over
equal halves: each rank's own loss, averaged by FSDP and over ranks for the log.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests import spawn_ranks
from tests.families import tiny_config

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

pytestmark = pytest.mark.usefixtures("one_thread")

WORLD = 2
STEPS = 4
LR = 1e-2
TIMEOUT = 120  # seconds for one spawned run, a hang fails instead of blocking CI
PROMPT = torch.tensor([[5, 17, 3, 42, 8, 11], [9, 2, 60, 33, 1, 70]])
NEW_TOKENS = 6


# -- spawning ---------------------------------------------------------------------------------


def spawn(target, tmp: Path, *args, world: int = WORLD) -> list:
    """`spawn_ranks.spawn` with this module's world size and timeout."""
    return spawn_ranks.spawn(target, tmp, *args, world=world, timeout=TIMEOUT)


# -- models and batches -----------------------------------------------------------------------


def make_model(family: str, seed: int = 0):
    from fmodel.facade import BertForSequenceClassification, LlamaForCausalLM

    torch.manual_seed(seed)
    if family == "llama":
        return LlamaForCausalLM(tiny_config("llama")).train()
    labels = {str(i): f"label_{i}" for i in range(3)}
    config = tiny_config("bert", id2label=labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).train()


def make_batch(family: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (4, 10), generator=g)
    if family == "llama":
        labels = ids.clone()
        labels[0, 2:7] = -100  # the first half has fewer labelled tokens than the second
        labels[3, 8:] = -100
        return {"input_ids": ids, "labels": labels}
    return {"input_ids": ids, "labels": torch.tensor([0, 2, 1, 2])}


def global_items(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return (batch["labels"][:, 1:] != -100).sum()


def train_step(model, optimizer, batch, family: str, world: int = 1) -> float:
    """One AdamW step on `batch` (this rank's part); the loss of the whole batch."""
    if family == "llama":
        loss = model(**batch).loss  # with num_items_in_batch: the whole batch's count
        (loss * world).backward()
        logged = loss.detach().clone()
        if world > 1:
            dist.all_reduce(logged)
    else:
        loss = model(**batch).loss
        loss.backward()
        logged = loss.detach().clone()
        if world > 1:
            dist.all_reduce(logged)
            logged /= world
    optimizer.step()
    optimizer.zero_grad()
    return logged.item()


def rank_batch(family: str, rank: int, world: int) -> dict[str, torch.Tensor]:
    batch = make_batch(family)
    part = {k: v.chunk(world)[rank] for k, v in batch.items()}
    if family == "llama":
        part["num_items_in_batch"] = global_items(batch)
    return part


def single_losses(family: str, checkpointing: bool, steps: int = STEPS) -> list[float]:
    model = make_model(family)
    if checkpointing:
        model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    batch = rank_batch(family, 0, 1)
    return [train_step(model, optimizer, batch, family) for _ in range(steps)]


def sharded(family: str, seed: int = 0, checkpointing: bool = False):
    from fmodel.distributed.fsdp import fully_shard_model

    model = make_model(family, seed)
    if checkpointing:
        model.gradient_checkpointing_enable()
    fully_shard_model(model)
    return model, torch.optim.AdamW(model.parameters(), lr=LR)


# -- the ranks' work --------------------------------------------------------------------------


def _fsdp_and_dcp(rank: int, world: int, folder: str) -> dict:
    """Every FSDP2 run of this module on one rank (one spawn for all: each costs seconds)."""
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.tensor import DTensor

    from fmodel.distributed.fsdp import layer_modules

    out: dict = {}
    for family in ("llama", "bert"):
        for checkpointing in (False, True):
            model, optimizer = sharded(family, checkpointing=checkpointing)
            calls = []  # a checkpointed layer runs twice a step: forward, then its recomputation
            handle = layer_modules(model)[0].register_forward_pre_hook(lambda *_, c=calls: c.append(1))
            batch = rank_batch(family, rank, world)
            out[family, checkpointing] = [
                train_step(model, optimizer, batch, family, world) for _ in range(STEPS)
            ]
            out[family, checkpointing, "layer calls"] = len(calls)
            handle.remove()
    # save_pretrained from every rank: one ordinary checkpoint of the trained weights
    model.save_pretrained(os.path.join(folder, "saved"), is_main_process=rank == 0)
    out["saved_files"] = sorted(os.listdir(os.path.join(folder, "saved")))
    # what FSDP made of the facade: DTensor parameters, shared with `model.state`
    params = dict(model.named_parameters())
    state = model.state
    out["dtensor_params"] = all(isinstance(p, DTensor) for p in params.values())
    out["state_shares"] = all(state.params[name] is p for name, p in params.items())

    # DCP: 2 steps, save (model + optimizer), 2 more; fresh model and optimizer restore, 2 steps
    family = "llama"
    model, optimizer = sharded(family)
    batch = rank_batch(family, rank, world)
    first = [train_step(model, optimizer, batch, family, world) for _ in range(2)]
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(folder, "dcp"))
    continued = [train_step(model, optimizer, batch, family, world) for _ in range(2)]

    fresh, fresh_optimizer = sharded(family, seed=123)  # other weights: the restore must replace them
    model_sd, optim_sd = get_state_dict(fresh, fresh_optimizer)
    loaded = {"model": model_sd, "optim": optim_sd}
    dcp.load(loaded, checkpoint_id=os.path.join(folder, "dcp"))
    set_state_dict(fresh, fresh_optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    resumed = [train_step(fresh, fresh_optimizer, batch, family, world) for _ in range(2)]
    out["dcp"] = {"first": first, "continued": continued, "resumed": resumed}

    # inference on the FSDP2 model: forward and greedy generate (the layers gather their shards)
    model, _ = sharded("llama")
    model.eval()
    with torch.no_grad():
        out["eval_logits"] = model(input_ids=PROMPT).logits
    out["eval_tokens"] = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
    import fmodel

    try:  # the functional forward cannot run FSDP2's DTensor parameters: named, not torch's error
        fmodel.forward(model.state, PROMPT)
        out["functional_forward"] = "ran"
    except fmodel.errors.StateDistributedError as exc:
        out["functional_forward"] = str(exc)
    return out


@pytest.fixture(scope="module")
def fsdp_runs(spawned_runs):
    tmp, runs = spawned_runs
    return tmp / "fsdp", [run["fsdp"] for run in runs]


# -- FSDP2 and DCP ----------------------------------------------------------------------------


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_fsdp2_training_equals_one_process(fsdp_runs, family, checkpointing):
    _, fsdp_runs = fsdp_runs
    expected = single_losses(family, checkpointing)
    for rank, run in enumerate(fsdp_runs):
        got = run[family, checkpointing]
        assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < 1e-5, (rank, got, expected)
    assert expected[-1] < expected[0] - 0.05  # the steps train: a comparison of moving losses
    assert fsdp_runs[0][family, checkpointing, "layer calls"] == STEPS * (2 if checkpointing else 1)


def test_fsdp2_parameters_are_dtensors_the_state_shares(fsdp_runs):
    _, fsdp_runs = fsdp_runs
    assert all(run["dtensor_params"] and run["state_shares"] for run in fsdp_runs)


def test_fsdp2_forward_and_generate_equal_one_process(fsdp_runs):
    _, fsdp_runs = fsdp_runs
    model = make_model("llama").eval()
    with torch.no_grad():
        logits = model(input_ids=PROMPT).logits
    tokens = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
    for run in fsdp_runs:
        assert (run["eval_logits"] - logits).abs().max().item() < 1e-5
        assert torch.equal(run["eval_tokens"], tokens)
        assert "DTensors without fmodel's tensor-parallel layout" in run["functional_forward"]


def test_dcp_restore_resumes_to_the_same_losses(fsdp_runs):
    _, fsdp_runs = fsdp_runs
    expected = single_losses("llama", checkpointing=False)
    for run in fsdp_runs:
        dcp = run["dcp"]
        assert max(abs(a - b) for a, b in zip(dcp["first"] + dcp["continued"], expected, strict=True)) < 1e-5
        assert max(abs(a - b) for a, b in zip(dcp["resumed"], dcp["continued"], strict=True)) < 1e-6, dcp


def test_fsdp2_save_pretrained_from_every_rank_writes_the_trained_weights(fsdp_runs):
    import fmodel

    tmp, runs = fsdp_runs
    assert runs[0]["saved_files"] == runs[1]["saved_files"]
    assert "model.safetensors" in runs[0]["saved_files"]
    model = make_model("bert", 0)  # the last FSDP run: BERT with checkpointing, trained STEPS steps
    model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    batch = rank_batch("bert", 0, 1)
    for _ in range(STEPS):
        train_step(model, optimizer, batch, "bert")
    saved = fmodel.load(tmp / "saved")
    trained = model.state
    assert sorted(saved.params) == sorted(trained.params)
    worst = max((saved.params[k] - trained.params[k]).abs().max().item() for k in trained.params)
    # float32 rounding apart: checkpointing's no-grad forward runs oneDNN's product on this
    # process's plain weights and F.linear on FSDP's DTensors (measured 1.8e-5 after the steps)
    assert worst < 1e-4, worst


# -- from_pretrained(tp_plan="auto") ------------------------------------------------------------


def tp_checkpoints(tmp: Path) -> tuple[Path, Path, dict[str, str]]:
    """A tiny Llama (4 heads, 2 kv heads: 2 ranks divide them), one with 3 heads (they do not),
    and the other families of the tensor-parallel tests: GPT-2 (its fused c_attn packed by heads,
    its LM head tied to the vocab-parallel embeddings) and a BERT classifier."""
    from fmodel.facade import GPT2LMHeadModel, LlamaForCausalLM

    good, bad = tmp / "llama", tmp / "llama-3-heads"
    make_model("llama").save_pretrained(good)
    torch.manual_seed(0)
    config = tiny_config("llama", hidden_size=24, num_attention_heads=3, num_key_value_heads=3, head_dim=8)
    LlamaForCausalLM(config).save_pretrained(bad)
    torch.manual_seed(0)
    GPT2LMHeadModel(tiny_config("gpt2")).save_pretrained(tmp / "gpt2")
    make_model("bert").save_pretrained(tmp / "bert")
    return good, bad, {family: str(tmp / family) for family in OTHER_FAMILIES}


OTHER_FAMILIES = ("gpt2", "bert")
# a plan of its own: the layers split as the family's, the embeddings and LM head replicated
LAYERS_PLAN = {
    **{f"model.layers.*.self_attn.{p}": "colwise" for p in ("q_proj", "k_proj", "v_proj")},
    "model.layers.*.self_attn.o_proj": "rowwise",
    "model.layers.*.mlp.gate_proj": "colwise",
    "model.layers.*.mlp.up_proj": "colwise",
    "model.layers.*.mlp.down_proj": "rowwise",
}


def _auto_class(family: str):
    from fmodel.facade import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if family == "bert" else AutoModelForCausalLM


def _tensor_parallel(rank: int, world: int, good: str, bad: str, out: str, others: dict[str, str]) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    import fmodel
    from fmodel.errors import PlanDivisibilityError
    from fmodel.facade import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(good, tp_plan="auto")
    result = {
        "tp_size": model.tp_size,
        "sharded": sorted(
            n for n, p in model.named_parameters() if isinstance(p, DTensor) and p.placements[0].is_shard()
        ),
        "logits": model(input_ids=PROMPT).logits.detach(),
        "tokens": model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False),
    }
    with torch.no_grad():  # the state it shares is a distributed state fmodel's own forward runs
        result["state_logits"] = fmodel.forward(model.state, PROMPT).logits
        result["base_hidden"] = model.model(PROMPT).last_hidden_state  # Transformers' model.model(...)
    model.save_pretrained(out, is_main_process=rank == 0)
    # a 2-D mesh names its "tp" dimension; tp_size must agree with it
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
    again = AutoModelForCausalLM.from_pretrained(good, tp_plan="auto", device_mesh=mesh, tp_size=world)
    result["mesh_logits"] = again(input_ids=PROMPT).logits.detach()
    # a plan of its own: kept by the model, its state and its forward
    custom = AutoModelForCausalLM.from_pretrained(good, tp_plan=LAYERS_PLAN)
    with torch.no_grad():
        result["custom_logits"] = custom(input_ids=PROMPT).logits
        result["custom_state_logits"] = fmodel.forward(custom.state, PROMPT).logits
    result["custom_plan"] = custom.tp_plan
    result["custom_sharded"] = sorted(
        n for n, p in custom.named_parameters() if isinstance(p, DTensor) and p.placements[0].is_shard()
    )
    try:
        AutoModelForCausalLM.from_pretrained(bad, tp_plan="auto")
    except PlanDivisibilityError as error:
        result["bad_heads"] = str(error)
    for family, folder in others.items():
        other = _auto_class(family).from_pretrained(folder, tp_plan="auto")
        with torch.no_grad():
            result[family] = {"logits": other(input_ids=PROMPT).logits}
        if family != "bert":
            result[family]["tokens"] = other.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
        other.save_pretrained(f"{out}-{family}")
    return result


def _every_run(rank: int, world: int, tmp: str, checkpoints) -> dict:
    """The FSDP2 runs and the tensor-parallel ones of this module on one rank: one spawn for
    the module (starting two ranks costs seconds)."""
    fsdp = os.path.join(tmp, "fsdp")
    os.makedirs(fsdp, exist_ok=True)
    good, bad, others = checkpoints
    return {
        "fsdp": _fsdp_and_dcp(rank, world, fsdp),
        "tp": _tensor_parallel(rank, world, good, bad, os.path.join(tmp, "tp", "saved"), others),
    }


@pytest.fixture(scope="module")
def spawned_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ranks")
    good, bad, others = tp_checkpoints(tmp / "tp")
    return tmp, spawn(_every_run, tmp, str(tmp), (str(good), str(bad), others))


@pytest.fixture(scope="module")
def tp_runs(spawned_runs):
    tmp, runs = spawned_runs
    return tmp / "tp" / "llama", tmp / "tp" / "saved", [run["tp"] for run in runs]


def single_process(folder: Path):
    from fmodel.facade import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        logits, hidden = model(input_ids=PROMPT).logits, model.model(PROMPT).last_hidden_state
    return logits, hidden, model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)


def test_tp_plan_auto_forward_and_generate_equal_one_process(tp_runs):
    good, _, runs = tp_runs
    logits, hidden, tokens = single_process(good)
    for run in runs:
        assert run["tp_size"] == WORLD
        assert "model.layers.0.self_attn.q_proj.weight" in run["sharded"]
        assert "lm_head.weight" in run["sharded"]
        assert (run["logits"] - logits).abs().max().item() < 1e-5
        assert (run["mesh_logits"] - logits).abs().max().item() < 1e-5
        assert (run["state_logits"] - logits).abs().max().item() < 1e-5
        assert (run["base_hidden"] - hidden).abs().max().item() < 1e-5
        assert torch.equal(run["tokens"], tokens)
    assert tokens.shape[1] == PROMPT.shape[1] + NEW_TOKENS


LAYER_MODULES = [p.rpartition("*.")[2] for p in LAYERS_PLAN]


def test_tp_plan_as_a_dict(tp_runs):
    good, _, runs = tp_runs
    logits, _, _ = single_process(good)
    for run in runs:
        assert run["custom_plan"] == LAYERS_PLAN
        assert run["custom_sharded"] == sorted(
            f"model.layers.{i}.{module}.weight" for i in range(2) for module in LAYER_MODULES
        )
        assert (run["custom_logits"] - logits).abs().max().item() < 1e-5
        assert (run["custom_state_logits"] - logits).abs().max().item() < 1e-5


def test_tp_save_pretrained_from_every_rank_writes_one_checkpoint(tp_runs):
    import fmodel

    good, saved, _ = tp_runs
    original, written = fmodel.load(good), fmodel.load(saved)
    assert sorted(written.params) == sorted(original.params)
    for name, tensor in original.params.items():
        assert torch.equal(written.params[name], tensor), name
    assert (saved / "config.json").is_file()


@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_tp_plan_auto_other_families(tp_runs, family):
    import fmodel

    good, saved, runs = tp_runs
    folder = good.parent / family
    model = _auto_class(family).from_pretrained(folder)
    with torch.no_grad():
        logits = model(input_ids=PROMPT).logits
    for run in runs:
        assert (run[family]["logits"] - logits).abs().max().item() < 1e-5
        if family != "bert":
            tokens = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
            assert torch.equal(run[family]["tokens"], tokens)
    original, written = fmodel.load(folder), fmodel.load(f"{saved}-{family}")
    assert sorted(written.params) == sorted(original.params)
    for name, tensor in original.params.items():  # a packed c_attn back in q | k | v order
        assert torch.equal(written.params[name], tensor), name


def test_tp_world_size_not_dividing_heads_is_named(tp_runs):
    for run in tp_runs[2]:
        assert "3" in run["bad_heads"] and "2" in run["bad_heads"]


def test_tp_plan_argument_errors(tmp_path, monkeypatch):
    from fmodel.errors import DistributedError, InvalidArgumentError, PlanError
    from fmodel.facade import AutoModelForCausalLM

    folder = tmp_path / "m"
    make_model("llama").save_pretrained(folder)
    with pytest.raises(PlanError, match="'auto'"):
        AutoModelForCausalLM.from_pretrained(folder, tp_plan="colwise")
    with pytest.raises(PlanError, match="str -> str"):
        AutoModelForCausalLM.from_pretrained(folder, tp_plan={"lm_head": 1})
    with pytest.raises(InvalidArgumentError, match="mutually exclusive"):
        AutoModelForCausalLM.from_pretrained(folder, tp_plan="auto", device_map="cpu")
    with pytest.raises(InvalidArgumentError, match="only used with tp_plan"):
        AutoModelForCausalLM.from_pretrained(folder, tp_size=2)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert not dist.is_initialized()
    with pytest.raises(DistributedError, match="torchrun"):
        AutoModelForCausalLM.from_pretrained(folder, tp_plan="auto")


TORCHRUN_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from fmodel.facade import AutoModelForCausalLM
folder, out = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder, tp_plan="auto")  # the process group from env://
prompt = torch.tensor({prompt})
logits = model(input_ids=prompt).logits.detach()
if torch.distributed.get_rank() == 0:
    torch.save({{"logits": logits, "world": torch.distributed.get_world_size(), "tp_size": model.tp_size}}, out)
torch.distributed.destroy_process_group()
"""


def test_tp_plan_auto_under_torchrun(tmp_path):
    import subprocess
    import sys

    folder = tmp_path / "m"
    make_model("llama").save_pretrained(folder)
    script = tmp_path / "run.py"
    script.write_text(TORCHRUN_SCRIPT.format(prompt=PROMPT.tolist()))
    out = tmp_path / "out.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env["FMODEL_NO_TRANSFORMERS"] = (
        "1"  # what is tested is the env:// start; importing Transformers costs seconds
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*command, str(script), str(folder), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    got = torch.load(out)
    assert got["world"] == 2 and got["tp_size"] == 2
    logits, _, _ = single_process(folder)
    assert (got["logits"] - logits).abs().max().item() < 1e-5
