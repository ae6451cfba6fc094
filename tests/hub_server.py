"""A local stand-in for the Hugging Face Hub, for tests that exercise `push_to_hub` and `from_pretrained(repo_id)`.

It speaks the subset of the Hub HTTP API that `huggingface_hub` 2.4 uses for model repos: `create_repo`,
`create_commit`/`upload_folder` (preupload answers uploadMode "regular", so every file travels inline as base64 in
the NDJSON commit and no LFS/Xet server is needed), `model_info` by revision, the tree listing, and file
download (HEAD/GET `/{repo}/resolve/{revision}/{path}`). Everything lives in memory and each commit keeps a
snapshot, so any earlier commit sha still resolves. Only model repos are served, and `create_pr` commits and LFS
files are refused with a 400.

    with LocalHub() as hub, point_clients_at(hub):
        model.push_to_hub("user/tiny")
        assert "config.json" in hub.files("user/tiny")

For a subprocess, pass `env=hub_env(hub, tmp_path / "hf_home")` instead: `huggingface_hub` reads `HF_ENDPOINT` at
import time.

Failures to test against: `hub.outage = 500` makes the server answer every request with that status (no
route runs), and `closed_port_url()` is an endpoint where nothing listens. Both `point_clients_at` and `hub_env`
take such a URL in place of a `LocalHub`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

DEFAULT_NAMESPACE = "user"
"""Namespace given to `create_repo("name")` calls that name no organisation (the real Hub uses the token's user)."""

DUMMY_TOKEN = "hf_localhubdummytoken"


def git_blob_sha(data: bytes) -> str:
    """The git blob id of `data`: what the Hub reports as a non-LFS file's `oid` and `ETag`."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    """One commit of a repo: its id and the full file snapshot after it."""

    sha: str
    files: dict[str, bytes]


@dataclass
class Repo:
    """A model repo with a single branch, `main`, and its commit history (oldest first)."""

    commits: list[Commit]

    @property
    def head(self) -> Commit:
        return self.commits[-1]

    def at(self, revision: str) -> Commit | None:
        """The commit that `revision` names (`main`, a full commit sha, or an unambiguous prefix of one)."""
        if revision == "main":
            return self.head
        matches = [commit for commit in self.commits if commit.sha.startswith(revision)]
        return matches[-1] if len(revision) >= 7 and len(matches) == 1 else None

    def commit(self, files: dict[str, bytes], summary: str) -> Commit:
        """Appends a commit whose snapshot is `files`. The sha chains the parent, like git, so it is unique."""
        manifest = json.dumps(sorted((path, git_blob_sha(data)) for path, data in files.items()))
        sha = hashlib.sha1(f"{self.head.sha}\n{summary}\n{manifest}".encode()).hexdigest()
        self.commits.append(Commit(sha, files))
        return self.head


@dataclass
class HubStore:
    """Everything the server knows: repos by id (`namespace/name`) and every request it saw, in order."""

    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    outage: int | None = None
    """When set, every request is answered with this HTTP status, as during a Hub outage."""

    def create_repo(self, repo_id: str) -> Repo:
        """Creates `repo_id` with one empty initial commit (the real Hub's first commit adds .gitattributes)."""
        initial = Commit(hashlib.sha1(f"initial commit of {repo_id}".encode()).hexdigest(), {})
        self.repos[repo_id] = Repo([initial])
        return self.repos[repo_id]


class HubError(Exception):
    """An error answer: HTTP `status` with the Hub's `X-Error-Code` header, which `huggingface_hub` maps to its
    exception types (`RepoNotFound` -> RepositoryNotFoundError, `EntryNotFound` -> EntryNotFoundError, ...)."""

    def __init__(self, status: int, error_code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.error_code, self.headers = status, error_code, headers or {}


_REPO = r"(?P<repo>[^/]+/[^/]+)"
_REV = r"(?P<rev>[^/]+)"  # refs like "refs/pr/1" arrive %-quoted, so a revision is one path segment


@dataclass
class Reply:
    """A route's answer when it is not a plain 200 with a JSON body: a file, or a non-error status."""

    status: int
    body: bytes | dict | list
    headers: dict[str, str] = field(default_factory=dict)


class HubHandler(BaseHTTPRequestHandler):
    """Answers one request against `self.server.store`. `ROUTES` maps (method, path regex) to a route method,
    which returns the JSON body (or a `Reply`) or raises `HubError`."""

    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every answer therefore carries Content-Length
    server: LocalHubServer
    body: bytes  # the request body (huggingface_hub always sends a Content-Length, never chunked uploads)

    ROUTES: list[tuple[str, re.Pattern[str], str]] = [
        ("POST", re.compile(r"/api/repos/create"), "create_repo"),
        ("POST", re.compile(r"/api/validate-yaml"), "validate_yaml"),
        ("POST", re.compile(rf"/api/models/{_REPO}/preupload/{_REV}"), "preupload"),
        ("POST", re.compile(rf"/api/models/{_REPO}/commit/{_REV}"), "commit"),
        ("GET", re.compile(rf"/api/models/{_REPO}(?:/revision/{_REV})?"), "model_info"),
        ("GET", re.compile(rf"/api/models/{_REPO}/tree/{_REV}(?:/(?P<path>.*))?"), "tree"),
        ("GET", re.compile(rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)"), "download"),
        ("HEAD", re.compile(rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)"), "download"),
    ]

    # ---- plumbing ---------------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def log_message(self, format: str, *args: object) -> None:
        """Silenced: `store.requests` is the log, and stderr noise would clutter pytest output."""

    def _dispatch(self, method: str) -> None:
        path = urlsplit(self.path).path
        store = self.server.store
        with store.lock:
            store.requests.append((method, path))
            outage = store.outage
        # Read the body before routing: on a keep-alive connection an unread body would corrupt the next request.
        self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if outage is not None:
            self._send(outage, {"error": f"the local hub is answering {outage} to every request"})
            return
        route = next(
            (
                (name, match)
                for route_method, pattern, name in self.ROUTES
                if route_method == method and (match := pattern.fullmatch(path))
            ),
            None,
        )
        if route is None:
            self._send(404, {"error": f"the local hub has no route for {method} {path}"})
            return
        name, match = route
        params = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
        try:
            with store.lock:  # one route at a time reads or writes the store, so commits never interleave
                reply = getattr(self, name)(**params)
        except HubError as error:
            self._send(error.status, {"error": str(error)}, {"X-Error-Code": error.error_code, **error.headers})
            return
        if isinstance(reply, Reply):
            self._send(reply.status, reply.body, reply.headers)
        else:
            self._send(200, reply)

    def _send(self, status: int, body: bytes | dict | list, headers: dict[str, str] | None = None) -> None:
        """Writes a complete answer; a dict/list body is sent as JSON. HEAD gets the headers only."""
        headers = dict(headers or {})
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _url(self, suffix: str) -> str:
        return f"http://{self.headers.get('Host')}/{suffix}"

    def _repo(self, repo: str) -> Repo:
        if repo not in self.server.store.repos:
            raise HubError(404, "RepoNotFound", f"Repository {repo} not found")
        return self.server.store.repos[repo]

    def _commit(self, repo: str, rev: str) -> Commit:
        commit = self._repo(repo).at(rev)
        if commit is None:
            raise HubError(404, "RevisionNotFound", f"Revision {rev} not found in {repo}")
        return commit

    # ---- routes -----------------------------------------------------------------------------------------------

    def create_repo(self) -> dict | Reply:
        request = json.loads(self.body or b"{}")
        repo_id = f"{request.get('organization') or DEFAULT_NAMESPACE}/{request['name']}"
        if repo_id in self.server.store.repos:
            # As on the Hub: 409 plus the url, which `create_repo(exist_ok=True)` (used by push_to_hub) accepts.
            return Reply(409, {"error": "You already created this model repo", "url": self._url(repo_id)})
        self.server.store.create_repo(repo_id)
        return {"url": self._url(repo_id), "name": repo_id, "id": repo_id}

    def validate_yaml(self) -> dict:
        """Model-card metadata check before a commit that touches README.md; everything is valid here."""
        return {"errors": [], "warnings": []}

    def preupload(self, repo: str, rev: str) -> dict:
        self._commit(repo, rev)
        files = json.loads(self.body)["files"]
        # "regular" makes the client inline every file in the commit payload instead of uploading it via LFS/Xet.
        return {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}

    def commit(self, repo: str, rev: str) -> dict:
        """Applies an NDJSON commit (`header`, then `file`/`deletedFile`/`deletedFolder` lines) on top of `rev`."""
        if rev != "main" or "create_pr=1" in self.path:
            raise HubError(400, "BadRequest", "the local hub only commits to main (no pull requests)")
        target = self._repo(repo)
        files = dict(target.head.files)
        summary = ""
        for line in self.body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary", "")
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {path: data for path, data in files.items() if not path.startswith(prefix)}
            else:
                raise HubError(400, "BadRequest", f"the local hub cannot apply a {key!r} commit operation")
        commit = target.commit(files, summary)
        return {"commitUrl": self._url(f"{repo}/commit/{commit.sha}"), "commitOid": commit.sha, "pullRequestUrl": None}

    def model_info(self, repo: str, rev: str = "main") -> dict:
        commit = self._commit(repo, rev)
        siblings = [{"rfilename": path} for path in sorted(commit.files)]
        return {"id": repo, "modelId": repo, "sha": commit.sha, "private": False, "siblings": siblings}

    def tree(self, repo: str, rev: str, path: str = "") -> list[dict]:
        """Lists a folder: its files and subfolders, or with `?recursive=true` every file below it."""
        commit = self._commit(repo, rev)
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        recursive = "recursive=true" in urlsplit(self.path).query.lower()
        entries: dict[str, dict] = {}
        for file_path in sorted(commit.files):
            if not file_path.startswith(prefix):
                continue
            rest = file_path[len(prefix) :]
            if "/" in rest and not recursive:
                folder = prefix + rest.split("/")[0]
                entries[folder] = {"type": "directory", "path": folder, "oid": git_blob_sha(folder.encode())}
            else:
                data = commit.files[file_path]
                entries[file_path] = {"type": "file", "path": file_path, "size": len(data), "oid": git_blob_sha(data)}
        if prefix and not entries:
            raise HubError(404, "EntryNotFound", f"{path} does not exist in {repo}@{rev}")
        return list(entries.values())

    def download(self, repo: str, rev: str, path: str) -> Reply:
        """Serves a file with the headers `hf_hub_download` needs to place it in the cache."""
        commit = self._commit(repo, rev)
        if path not in commit.files:
            raise HubError(
                404, "EntryNotFound", f"{path} does not exist in {repo}@{rev}", {"X-Repo-Commit": commit.sha}
            )
        data = commit.files[path]
        headers = {
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{git_blob_sha(data)}"',
            "Content-Type": "application/octet-stream",
        }
        return Reply(200, data, headers)


class LocalHubServer(ThreadingHTTPServer):
    """A `ThreadingHTTPServer` that carries the `HubStore` its handlers read and write."""

    daemon_threads = True  # a client that leaves a connection open must not keep the test process alive

    def __init__(self, store: HubStore):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.store = store


class LocalHub:
    """Runs a `LocalHubServer` on an ephemeral loopback port for the duration of a `with` block.

    `url` is the endpoint to give clients, `files(repo_id)` the repo's current files, `requests` the
    (method, path) pairs the server has answered, in order.
    """

    def __init__(self) -> None:
        self.store = HubStore()
        self._server: LocalHubServer | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LocalHub:
        self._server = LocalHubServer(self.store)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="local-hub", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    @property
    def url(self) -> str:
        assert self._server is not None, "use LocalHub as a context manager"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def requests(self) -> list[tuple[str, str]]:
        with self.store.lock:
            return list(self.store.requests)

    @property
    def outage(self) -> int | None:
        """The status every request gets while set (see `HubStore.outage`); None serves normally."""
        return self.store.outage

    @outage.setter
    def outage(self, status: int | None) -> None:
        with self.store.lock:
            self.store.outage = status

    def files(self, repo_id: str) -> dict[str, bytes]:
        """The files at the head of `repo_id` (KeyError if it was never created)."""
        with self.store.lock:
            return dict(self.store.repos[repo_id].head.files)


# Offline switches forbid talking to the hub at all; cache overrides would bypass the private HF_HOME.
_ENV_THAT_WOULD_INTERFERE = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_ASSETS_CACHE",
    "HUGGINGFACE_ASSETS_CACHE",
    "HF_XET_CACHE",
)


def closed_port_url() -> str:
    """An endpoint on 127.0.0.1 where nothing listens: a port the OS handed out, released again. Connecting is
    refused at once, as for a Hub that is down or a network that drops the connection."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _endpoint(hub: LocalHub | str) -> str:
    return hub if isinstance(hub, str) else hub.url


def hub_env(hub: LocalHub | str, hf_home: str | os.PathLike, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a subprocess that should talk to `hub` (a `LocalHub` or an endpoint URL): `base` (default
    `os.environ`) with the endpoint, a private cache and a dummy token set, and offline switches, telemetry and
    Xet turned off."""
    env = dict(os.environ if base is None else base)
    for key in _ENV_THAT_WOULD_INTERFERE:
        env.pop(key, None)
    env.update(
        HF_ENDPOINT=_endpoint(hub),
        HF_HOME=str(Path(hf_home)),
        HF_TOKEN=DUMMY_TOKEN,
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        NO_PROXY="127.0.0.1,localhost",
    )
    return env


@contextlib.contextmanager
def point_clients_at(hub: LocalHub | str) -> Iterator[None]:
    """Points this process's `huggingface_hub` and `transformers` clients at `hub` (a `LocalHub` or an endpoint
    URL), restoring them on exit.

    `huggingface_hub` reads `HF_ENDPOINT` and `HF_HUB_OFFLINE` once at import, so setting the variables here would
    be too late: patch the module constants that `HfApi()`, `hf_hub_url` and the HTTP session read at call time,
    and drop transformers' cached `HfApi` singleton so it is rebuilt against the new endpoint (and again on exit).
    Offline mode is lifted because the hub is on loopback; `HF_TOKEN` gets a dummy because uploads require one.
    """
    import huggingface_hub.constants as hf_constants
    import transformers.utils.hub as transformers_hub

    saved = (
        hf_constants.ENDPOINT,
        hf_constants.HUGGINGFACE_CO_URL_TEMPLATE,
        hf_constants.HF_HUB_OFFLINE,
        transformers_hub._hf_api,
    )
    saved_token = os.environ.get("HF_TOKEN")
    hf_constants.ENDPOINT = _endpoint(hub)
    hf_constants.HUGGINGFACE_CO_URL_TEMPLATE = _endpoint(hub) + "/{repo_id}/resolve/{revision}/{filename}"
    hf_constants.HF_HUB_OFFLINE = False
    transformers_hub._hf_api = None
    os.environ["HF_TOKEN"] = DUMMY_TOKEN
    try:
        yield
    finally:
        (
            hf_constants.ENDPOINT,
            hf_constants.HUGGINGFACE_CO_URL_TEMPLATE,
            hf_constants.HF_HUB_OFFLINE,
            transformers_hub._hf_api,
        ) = saved
        if saved_token is None:
            os.environ.pop("HF_TOKEN", None)
        else:
            os.environ["HF_TOKEN"] = saved_token
