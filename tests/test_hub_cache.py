"""Hub ids resolve through huggingface_hub's cache with no network at all.

Each test lays out a cache folder the way huggingface_hub does (blobs, snapshots of
symlinks, refs), checks the layout with huggingface_hub's own API, and loads from it offline.
Every socket connection and DNS lookup is refused, so a test that tries the network fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch

import fmodel

REPO = "tiny-org/tiny-llama"
COMMIT_A = "a" * 40
COMMIT_B = "0123456789abcdef0123456789abcdef01234567"
TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


class NetworkUsed(AssertionError):
    pass


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise NetworkUsed(f"a test tried to use the network: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    # Keep huggingface_hub away from the user's own cache and token.
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))


def reset_hub_sessions() -> None:
    """huggingface_hub < 1.0 bakes the offline flag into its cached HTTP session; >= 1.0 reads it
    per request."""
    reset = getattr(huggingface_hub.utils, "reset_sessions", None)
    if reset is not None:
        reset()


def random_state(*, seed: int = 0, tie: bool = True) -> fmodel.ModelState:
    config = fmodel.LlamaConfig(**TINY, tie_word_embeddings=tie)
    state, _ = fmodel.io.state_from_tensors(config, {}, allow_missing=True, seed=seed)
    return state


def cache_repo(
    cache: Path, repo_id: str, folder: Path, commit: str, refs: tuple[str, ...] = ("main",)
) -> Path:
    """Copy `folder` into a huggingface_hub cache as `repo_id` at `commit`; return the snapshot."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    blobs = repo_dir / "blobs"
    snapshot = repo_dir / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in sorted(folder.iterdir()):
        data = file.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo_dir / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo_dir / "refs" / ref).write_text(commit)
    return snapshot


def assert_same_params(a: fmodel.ModelState, b: fmodel.ModelState) -> None:
    assert sorted(a.params) == sorted(b.params)
    for name in a.params:
        assert torch.equal(a.params[name], b.params[name]), name
    assert dict(a.ties) == dict(b.ties)


@pytest.fixture
def hub(tmp_path) -> tuple[Path, Path, Path]:
    """(cache dir, checkpoint folder, snapshot folder) of REPO at COMMIT_A on main."""
    folder = tmp_path / "ckpt"
    fmodel.save(random_state(), folder)
    (folder / "tokenizer.json").write_text("{}")
    cache = tmp_path / "cache"
    snapshot = cache_repo(cache, REPO, folder, COMMIT_A)
    return cache, folder, snapshot


def test_cache_layout_is_what_huggingface_hub_expects(hub):
    cache, folder, snapshot = hub
    info = huggingface_hub.scan_cache_dir(cache)
    assert info.warnings == []
    [repo] = info.repos
    assert (repo.repo_id, repo.repo_type) == (REPO, "model")
    [revision] = repo.revisions
    assert revision.commit_hash == COMMIT_A
    assert set(revision.refs) == {"main"}
    assert {f.file_name for f in revision.files} == {p.name for p in folder.iterdir()}
    assert revision.size_on_disk == sum(p.stat().st_size for p in folder.iterdir())

    found = huggingface_hub.try_to_load_from_cache(REPO, "config.json", cache_dir=cache)
    assert found == str(snapshot / "config.json")
    assert (
        huggingface_hub.try_to_load_from_cache(REPO, "model.safetensors.index.json", cache_dir=cache) is None
    )
    assert huggingface_hub.try_to_load_from_cache("tiny-org/absent", "config.json", cache_dir=cache) is None


def test_hub_id_loads_from_the_cache_offline(hub):
    cache, folder, snapshot = hub
    state = fmodel.load(REPO, cache_dir=cache, local_files_only=True)
    assert_same_params(state, fmodel.load(folder))
    assert state.params["lm_head.weight"] is state.params["model.embed_tokens.weight"]
    files = fmodel.io.resolve_checkpoint(REPO, cache_dir=cache, local_files_only=True)
    assert files.source == REPO
    assert files.folder == str(snapshot)
    assert files.weights == (str(snapshot / "model.safetensors"),)
    assert files.format == "safetensors" and files.index is None


def test_sharded_repo_in_the_cache(tmp_path):
    folder = tmp_path / "sharded"
    state = random_state(tie=False)
    fmodel.save(state, folder, max_shard_size="60KB")
    assert len(list(folder.glob("model-*.safetensors"))) >= 4
    cache = tmp_path / "cache"
    snapshot = cache_repo(cache, REPO, folder, COMMIT_A)
    files = fmodel.io.resolve_checkpoint(REPO, cache_dir=cache, local_files_only=True)
    assert files.index == str(snapshot / "model.safetensors.index.json")
    assert sorted(files.weights) == sorted(str(p) for p in snapshot.glob("model-*.safetensors"))
    assert_same_params(fmodel.load(REPO, cache_dir=cache, local_files_only=True), state)


def test_revision_picks_the_snapshot(tmp_path):
    cache = tmp_path / "cache"
    old, new = random_state(seed=1), random_state(seed=2)
    for name, state, commit, refs in (("old", old, COMMIT_A, ("v1",)), ("new", new, COMMIT_B, ("main",))):
        fmodel.save(state, tmp_path / name)
        cache_repo(cache, REPO, tmp_path / name, commit, refs)
    assert_same_params(fmodel.load(REPO, cache_dir=cache, local_files_only=True), new)
    assert_same_params(fmodel.load(REPO, cache_dir=cache, local_files_only=True, revision=COMMIT_A), old)
    assert_same_params(fmodel.load(REPO, cache_dir=cache, local_files_only=True, revision="v1"), old)
    with pytest.raises(fmodel.CheckpointError, match=REPO):
        fmodel.load(REPO, cache_dir=cache, local_files_only=True, revision="v2")


@pytest.fixture
def hf_hub_offline(monkeypatch):
    """HF_HUB_OFFLINE=1 as huggingface_hub sees it (it reads the variable at import time and
    builds its HTTP session from it)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    reset_hub_sessions()
    yield
    monkeypatch.undo()
    reset_hub_sessions()


def test_hf_hub_offline_uses_the_cache(hub, hf_hub_offline):
    cache, folder, _ = hub
    state = fmodel.load(REPO, cache_dir=cache)  # no local_files_only: the offline flag alone suffices
    assert_same_params(state, fmodel.load(folder))


def test_hf_hub_offline_missing_repo_names_it(hub, hf_hub_offline):
    cache, _, _ = hub
    with pytest.raises(fmodel.CheckpointError, match=r"tiny-org/absent: no config.json found"):
        fmodel.load("tiny-org/absent", cache_dir=cache)


def test_network_down_falls_back_to_the_cache(hub, monkeypatch):
    # No flags at all and no network (DNS fails, as on an air-gapped machine): cached files serve.
    cache, folder, _ = hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # even if the caller set it
    reset_hub_sessions()
    lookups = []

    def no_dns(host, *args, **kwargs):
        lookups.append(host)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    def no_route(address, *args, **kwargs):  # some HTTP stacks resolve inside create_connection
        return no_dns(address[0])

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(socket, "create_connection", no_route)
    # huggingface_hub retries each HEAD call 5 times with backoff (~23 s per file); skip the waits.
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    assert_same_params(fmodel.load(REPO, cache_dir=cache), fmodel.load(folder))
    assert lookups and set(lookups) == {"huggingface.co"}  # it did try, and fell back
    with pytest.raises(fmodel.CheckpointError, match=r"tiny-org/absent: "):
        fmodel.load("tiny-org/absent", cache_dir=cache)
    monkeypatch.undo()
    reset_hub_sessions()


def test_hf_hub_offline_environment_variable_in_a_fresh_process(hub, tmp_path):
    cache, folder, _ = hub
    expected = fmodel.load(folder).params["model.layers.1.mlp.down_proj.weight"]
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import socket, sys, torch

        def refuse(*args, **kwargs):
            raise AssertionError("network used")

        socket.socket.connect = socket.getaddrinfo = socket.create_connection = refuse
        import fmodel

        state = fmodel.load({REPO!r}, cache_dir={str(cache)!r})
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        assert torch.equal(state.params["model.layers.1.mlp.down_proj.weight"], expected)
        try:
            fmodel.load("tiny-org/absent", cache_dir={str(cache)!r})
        except fmodel.CheckpointError as exc:
            assert "tiny-org/absent" in str(exc), exc
        else:
            sys.exit("missing repo did not raise")
        print("OFFLINE-OK")
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    env.pop("TRANSFORMERS_OFFLINE", None)
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("OFFLINE-OK")


# --------------------------------------------------------------------------- errors


def test_missing_repo_names_the_repo(hub):
    cache, _, _ = hub
    with pytest.raises(fmodel.CheckpointError, match=r"tiny-org/absent: no config.json found \(offline"):
        fmodel.load("tiny-org/absent", cache_dir=cache, local_files_only=True)


def test_cached_repo_without_weights(tmp_path):
    folder = tmp_path / "only-config"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", **TINY}))
    cache = tmp_path / "cache"
    cache_repo(cache, REPO, folder, COMMIT_A)
    with pytest.raises(
        fmodel.CheckpointError, match=rf"{REPO}: no weights found; expected model.safetensors"
    ):
        fmodel.load(REPO, cache_dir=cache, local_files_only=True)


def test_cached_index_with_a_shard_missing(tmp_path):
    folder = tmp_path / "sharded"
    fmodel.save(random_state(), folder, max_shard_size="60KB")
    missing = sorted(folder.glob("model-*.safetensors"))[-1]
    missing.unlink()
    cache = tmp_path / "cache"
    cache_repo(cache, REPO, folder, COMMIT_A)
    with pytest.raises(
        fmodel.CheckpointError, match=rf"{REPO}: shard {missing.name} listed in .* could not be fetched"
    ):
        fmodel.load(REPO, cache_dir=cache, local_files_only=True)


def test_broken_symlink_in_snapshot(hub):
    cache, _, snapshot = hub
    blob = (snapshot / "model.safetensors").resolve()
    blob.unlink()  # the snapshot entry now points nowhere (an interrupted download, a pruned blob)
    with pytest.raises(fmodel.CheckpointError, match=REPO):
        fmodel.load(REPO, cache_dir=cache, local_files_only=True)


@pytest.mark.parametrize("bad", ["a/b/c", "./not-here", "/abs/not-here"])
def test_neither_folder_nor_repo_id(tmp_path, bad):
    with pytest.raises(fmodel.CheckpointError, match=r"no such folder"):
        fmodel.load(bad, cache_dir=tmp_path, local_files_only=True)
