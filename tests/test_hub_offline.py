"""A hub id without the hub: offline mode, an unreachable endpoint, a damaged cache.

Offline (`local_files_only=True` / `HF_HUB_OFFLINE=1`) or unreachable (a closed local port as the
endpoint, refused connections, failed DNS), a repo the cache does not hold fails at once with
`HubUnavailableError` saying which switch or endpoint, which cache was searched, and how to use a
local copy; no hidden retries. A damaged cache (a ref to a missing snapshot, a broken blob symlink,
a folder where config.json belongs) raises a `CheckpointError` naming the path.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import huggingface_hub
import pytest

import fmodel
from fmodel.io.hub_fetch import HubFetcher
from tests.test_hub_cache import COMMIT_A, REPO, TINY, cache_repo, random_state

ABSENT = "tiny-org/absent"


@pytest.fixture(autouse=True)
def private_hf_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def cached(tmp_path):
    """(cache dir, snapshot folder) of REPO at COMMIT_A."""
    folder = tmp_path / "ckpt"
    fmodel.save(random_state(), folder)
    cache = tmp_path / "cache"
    return cache, cache_repo(cache, REPO, folder, COMMIT_A)


@pytest.fixture
def refused(monkeypatch):
    """Every connection refused at once (a closed port), and every sleep recorded: huggingface_hub's
    retries would sleep 1 + 2 + 4 + 8 + 8 s."""
    sleeps = []

    def refuse(*args, **kwargs):
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(time, "sleep", sleeps.append)
    huggingface_hub.utils.reset_sessions()
    yield sleeps
    monkeypatch.undo()
    huggingface_hub.utils.reset_sessions()


def _message(exc_info) -> str:
    return str(exc_info.value)


@pytest.mark.parametrize("how", ["local_files_only", "HF_HUB_OFFLINE"])
def test_offline_and_not_cached_says_offline_cache_and_local_copy(tmp_path, monkeypatch, how):
    kwargs = {"local_files_only": True} if how == "local_files_only" else {}
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    started = time.perf_counter()
    with pytest.raises(fmodel.HubUnavailableError) as info:
        fmodel.load(ABSENT, cache_dir=tmp_path / "cache", **kwargs)
    assert time.perf_counter() - started < 2
    text = _message(info)
    assert text.startswith(f"{ABSENT}: no config.json found (offline")
    switch = "local_files_only=True" if how == "local_files_only" else "HF_HUB_OFFLINE=1"
    assert f"offline mode is on: {switch}" in text
    assert str(tmp_path / "cache") in text  # which cache was searched
    assert "folder path" in text and f"huggingface-cli download {ABSENT}" in text
    assert "HF_HOME or cache_dir=" in text
    assert isinstance(info.value, (fmodel.CheckpointError, ConnectionError))


def test_offline_gguf_not_cached(tmp_path):
    with pytest.raises(fmodel.HubUnavailableError, match=r"no file 'm\.gguf' found \(offline"):
        fmodel.load_gguf(ABSENT, "m.gguf", cache_dir=tmp_path, local_files_only=True)


def test_unreachable_hub_fails_fast_without_retries(tmp_path, refused):
    started = time.perf_counter()
    with pytest.raises(fmodel.HubUnavailableError) as info:
        fmodel.load(ABSENT, cache_dir=tmp_path / "cache")
    assert time.perf_counter() - started < 2
    assert refused == []  # no backoff sleeps
    text = _message(info)
    assert "the hub could not be reached at https://huggingface.co" in text
    assert "ConnectionError" in text  # what went wrong
    assert f"local cache {tmp_path / 'cache'}, tried instead" in text
    assert "folder path" in text and "HF_HUB_OFFLINE=1" in text


def test_unreachable_hub_uses_the_cache(cached, refused):
    cache, snapshot = cached
    started = time.perf_counter()
    state = fmodel.load(REPO, cache_dir=cache)
    assert time.perf_counter() - started < 5
    assert refused == []
    assert sorted(state.params) == sorted(fmodel.load(snapshot).params)


def test_unreachable_cached_repo_missing_a_file_says_so(tmp_path, refused):
    folder = tmp_path / "only-config"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", **TINY}))
    cache = tmp_path / "cache"
    cache_repo(cache, REPO, folder, COMMIT_A)
    with pytest.raises(fmodel.CheckpointError, match=r"no weights found.*\(the hub could not be reached"):
        fmodel.load(REPO, cache_dir=cache)


def test_offline_cached_repo_missing_a_file_says_so(tmp_path):
    folder = tmp_path / "only-config"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", **TINY}))
    cache = tmp_path / "cache"
    cache_repo(cache, REPO, folder, COMMIT_A)
    with pytest.raises(fmodel.CheckpointError) as info:
        fmodel.load(REPO, cache_dir=cache, local_files_only=True)
    text = _message(info)
    assert "no weights found" in text and "offline mode is on: local_files_only=True" in text
    assert f"the cached snapshot of {REPO}" in text and "does not have it" in text


def test_ref_to_a_missing_snapshot(cached):
    cache, snapshot = cached
    ref = snapshot.parent.parent / "refs" / "main"
    ref.write_text("b" * 40)
    with pytest.raises(
        fmodel.CheckpointError, match=r"refs/main: .*names commit 'b{40}'.*no snapshot folder"
    ):
        fmodel.load(REPO, cache_dir=cache, local_files_only=True)


def test_broken_blob_symlink(cached):
    cache, snapshot = cached
    (snapshot / "config.json").resolve().unlink()
    with pytest.raises(fmodel.CheckpointError, match=r"config\.json: broken symlink in the hub cache"):
        fmodel.load(REPO, cache_dir=cache, local_files_only=True)


def test_config_json_that_is_a_folder(cached):
    cache, snapshot = cached
    (snapshot / "config.json").unlink()
    (snapshot / "config.json").mkdir()
    with pytest.raises(fmodel.CheckpointError, match=r"config\.json: the hub cache entry .* is a folder"):
        fmodel.load(REPO, cache_dir=cache, local_files_only=True)


def test_a_fetcher_probes_once(tmp_path, refused, monkeypatch):
    heads = []
    real = huggingface_hub.utils.get_session

    def counting():
        session = real()
        original = session.head

        def head(*args, **kwargs):
            heads.append(args)
            return original(*args, **kwargs)

        session.head = head
        return session

    monkeypatch.setattr(huggingface_hub.utils, "get_session", counting)
    hub = HubFetcher(ABSENT, cache_dir=tmp_path)
    for name in ("a.json", "b.json"):
        with pytest.raises(fmodel.HubUnavailableError):
            hub.fetch(name)
    assert len(heads) == 1 and hub.unreachable is not None and hub.cache_only


@pytest.fixture
def closed_port():
    """A local port nothing listens on: bound (so nobody else takes it) but never listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_closed_endpoint_in_a_fresh_process(tmp_path, cached, closed_port):
    cache, _ = cached
    endpoint = f"http://127.0.0.1:{closed_port}"
    script = textwrap.dedent(
        f"""
        import time, fmodel
        started = time.perf_counter()
        try:
            fmodel.load({ABSENT!r}, cache_dir={str(cache)!r})
        except fmodel.HubUnavailableError as exc:
            assert {endpoint!r} in str(exc), exc
            print("FAILED-IN", round(time.perf_counter() - started, 3))
        state = fmodel.load({REPO!r}, cache_dir={str(cache)!r})
        print("CACHED-OK", len(state.params))
        """
    )
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf-home")}
    env.pop("HF_HUB_OFFLINE", None)
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.split()
    assert "CACHED-OK" in lines
    assert float(lines[lines.index("FAILED-IN") + 1]) < 2
    assert "Retrying in" not in result.stderr


def test_facade_from_pretrained_unreachable_uses_the_cache_without_retries(cached, refused):
    from fmodel.facade import AutoModelForCausalLM

    cache, snapshot = cached
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(REPO, cache_dir=cache)
    assert time.perf_counter() - started < 10
    assert refused == []  # no backoff sleeps (generation_config.json included)
    assert sorted(model.state.params) == sorted(fmodel.load(snapshot).params)
    with pytest.raises(fmodel.HubUnavailableError, match="could not be reached"):
        AutoModelForCausalLM.from_pretrained(ABSENT, cache_dir=cache)
