"""An in-memory Hugging Face Hub behind huggingface_hub's own HTTP session.

`FakeHub` is a `requests` transport adapter installed with `huggingface_hub.configure_http_backend`,
so every line of huggingface_hub (create_repo, ModelCard.load / hf_hub_download, create_branch,
validate-yaml, preupload, the NDJSON commit payload) runs as against the real Hub; only the
bytes on the wire are answered here. It records each request and keeps each repo's files.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import requests
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict

ENDPOINT = "https://huggingface.co"


@dataclass
class Request:
    method: str
    path: str
    params: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Commit:
    repo_id: str
    revision: str
    summary: str
    description: str
    files: dict[str, bytes]
    create_pr: bool


@dataclass
class Repo:
    private: bool | None
    files: dict[str, bytes] = field(default_factory=dict)
    branches: set[str] = field(default_factory=lambda: {"main"})


class FakeHub(BaseAdapter):
    """Answers the Hub endpoints huggingface_hub uses to create a repo and commit files.

    Attributes:
        requests: every request, in order.
        repos: {repo_id: Repo}; a repo can be pre-filled (e.g. with a README.md).
        commits: every commit made.
        user: the namespace of repo ids given without one.
    """

    def __init__(self, user: str = "tester") -> None:
        super().__init__()
        self.user = user
        self.requests: list[Request] = []
        self.repos: dict[str, Repo] = {}
        self.commits: list[Commit] = []

    # -- requests' adapter interface ---------------------------------------------------------

    def send(self, request, **kwargs) -> requests.Response:
        url = urlparse(request.url)
        body = request.body or b""
        if isinstance(body, str):
            body = body.encode()
        elif not isinstance(body, bytes):  # a generator or file
            body = b"".join(body)
        record = Request(request.method, unquote(url.path), parse_qs(url.query), dict(request.headers), body)
        self.requests.append(record)
        status, payload, headers = self._route(record)
        response = requests.Response()
        response.status_code = status
        response.request = request
        response.url = request.url
        response.encoding = "utf-8"
        response.headers = CaseInsensitiveDict(headers)
        response._content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        response._content_consumed = True  # a complete body: iter_content serves it without a raw stream
        return response

    def close(self) -> None:
        pass

    # -- the endpoints ---------------------------------------------------------------------------

    def _route(self, r: Request) -> tuple[int, Any, dict[str, str]]:
        if r.method == "POST" and r.path == "/api/repos/create":
            data = r.json()
            repo_id = f"{data.get('organization') or self.user}/{data['name']}"
            if repo_id in self.repos:  # the Hub answers a conflict with the repo's url too
                return (
                    409,
                    {"error": "You already created this model repo", "url": f"{ENDPOINT}/{repo_id}"},
                    {},
                )
            self.repos[repo_id] = Repo(private=data.get("private"))
            return 200, {"url": f"{ENDPOINT}/{repo_id}", "name": repo_id}, {}
        if r.method == "POST" and r.path == "/api/validate-yaml":
            return 200, {}, {}
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/(.+)", r.path)
        if m and r.method == "POST":
            repo_id, kind, revision = m.groups()
            repo = self.repos.get(repo_id)
            if repo is None:
                return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
            if kind == "preupload":
                files = [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                    for f in r.json()["files"]
                ]
                return 200, {"files": files}, {}
            if kind == "branch":
                repo.branches.add(revision)
                return 200, {}, {}
            return self._commit(repo_id, repo, revision, r)
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", r.path)
        if m and r.method in ("HEAD", "GET"):
            repo_id, _, filename = m.groups()
            repo = self.repos.get(repo_id)
            if repo is None:
                return 404, {}, {"X-Error-Code": "RepoNotFound"}
            if filename not in repo.files:
                return 404, {}, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": "0" * 40}
            content = repo.files[filename]
            headers = {
                "X-Repo-Commit": "0" * 40,
                "ETag": f'"{hashlib.sha1(content).hexdigest()}"',
                "Content-Length": str(len(content)),
            }
            return 200, content if r.method == "GET" else b"", headers
        return 500, {"error": f"FakeHub: no route for {r.method} {r.path}"}, {}

    def _commit(self, repo_id: str, repo: Repo, revision: str, r: Request) -> tuple[int, Any, dict[str, str]]:
        lines = [json.loads(line) for line in r.body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        files = {
            line["value"]["path"]: base64.b64decode(line["value"]["content"])
            for line in lines
            if line["key"] == "file"
        }
        create_pr = r.params.get("create_pr") == ["1"]
        self.commits.append(
            Commit(repo_id, revision, header["summary"], header.get("description", ""), files, create_pr)
        )
        if not create_pr:
            repo.files.update(files)
        oid = hashlib.sha1(f"{repo_id}{len(self.commits)}".encode()).hexdigest()
        pr_url = f"{ENDPOINT}/{repo_id}/discussions/{len(self.commits)}" if create_pr else None
        return (
            200,
            {"commitUrl": f"{ENDPOINT}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": pr_url},
            {},
        )

    # -- reading back --------------------------------------------------------------------------

    def paths(self, method: str | None = None) -> list[str]:
        return [f"{r.method} {r.path}" for r in self.requests if method in (None, r.method)]


@contextlib.contextmanager
def installed(monkeypatch, tmp_path) -> Iterator[FakeHub]:
    """Route huggingface_hub's HTTP through a new `FakeHub` while the block runs (sockets
    refused, hub cache and token kept in `tmp_path`); everything is restored afterwards."""
    import socket

    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    if not hasattr(huggingface_hub, "configure_http_backend"):  # huggingface_hub >= 1.0 uses httpx
        import pytest

        pytest.skip("FakeHub answers huggingface_hub's requests backend (huggingface_hub < 1.0)")

    def refuse(*args, **kwargs):
        raise AssertionError(f"a test tried to use the network: {args!r}")

    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", ENDPOINT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    hub = FakeHub()

    def session() -> requests.Session:
        s = requests.Session()
        s.mount("https://", hub)
        s.mount("http://", hub)
        return s

    previous = _http._GLOBAL_BACKEND_FACTORY
    huggingface_hub.configure_http_backend(session)
    try:
        yield hub
    finally:
        huggingface_hub.configure_http_backend(previous)
