"""`publish` against a Hub API server on 127.0.0.1 that this test starts (`HF_ENDPOINT`).

The server implements what `huggingface_hub` 2.4 calls for `create_repo`, `list_repo_refs`,
`repo_info`, `list_repo_tree`, `upload_folder` (validate-yaml, preupload, commit on the
regular, non-LFS path: every file here is small) and `create_tag`, and what `datasets`
calls to load a published version (file resolve with GET and HEAD, tree listings by folder),
keeps the repos' commits, files and tags in memory, requires the bearer token, and records
every request.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, unquote, urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from builder.cli import app
from builder.publish import PublishError, publish_dataset

TOKEN = "hf_TestSecretToken_4f1c2e9a7b"
GITATTRIBUTES = b"*.parquet filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    private: bool
    commits: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)
    """(sha, files) in order; the last one is `main`."""
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def head(self) -> str:
        return self.commits[-1][0]

    def files_at(self, revision: str) -> dict[str, bytes] | None:
        sha = self.tags.get(revision, self.head if revision == "main" else revision)
        return next((files for s, files in self.commits if s == sha), None)

    def commit(self, files: dict[str, bytes], message: str) -> str:
        parent = self.commits[-1][0] if self.commits else ""
        digest = hashlib.sha1(json.dumps([parent, message, sorted((p, git_blob_sha1(d)) for p, d in files.items())])
                              .encode()).hexdigest()
        self.commits.append((digest, files))
        return digest


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class FakeHub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def calls(self, method: str, fragment: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and fragment in r.path]


def tree_entries(files: dict[str, bytes], folder: str, recursive: bool) -> list[dict[str, Any]]:
    """The Hub's tree listing of `folder`: its files and folders (everything below it when
    `recursive`), as `list_repo_tree` and `HfFileSystem` read it."""
    prefix = f"{folder}/" if folder else ""
    entries: dict[str, dict[str, Any]] = {}
    for path, data in sorted(files.items()):
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix):].split("/")
        depth = len(parts) if recursive else 1
        for i in range(1, min(depth, len(parts) - 1) + 1):  # the folders on the way
            sub = prefix + "/".join(parts[:i])
            entries.setdefault(sub, {"type": "directory", "path": sub, "oid": git_blob_sha1(sub.encode()), "size": 0})
        if len(parts) <= depth:
            entries[path] = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
    return list(entries.values())


class Handler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    def _reply(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _handle(self, method: str) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        with self.server.lock:
            self.server.requests.append(Request(method, url.path, dict(self.headers.items()), body))
            if self.headers.get("authorization") != f"Bearer {TOKEN}":
                return self._reply(401, {"error": "Invalid credentials"})
            try:
                self._route(method, url.path, body)
            except KeyError as e:
                self._reply(404, {"error": f"not found: {e}"}, {"X-Error-Code": "RepoNotFound"})

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def _file(self, method: str, repo: Repo, revision: str, path: str) -> None:
        """`/datasets/{repo}/resolve/{revision}/{path}`: a file's bytes (GET) or headers (HEAD)."""
        files = repo.files_at(revision)
        if files is None or path not in files:
            return self._reply(404, {"error": "entry not found"}, {"X-Error-Code": "EntryNotFound"})
        data = files[path]
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", f'"{git_blob_sha1(data)}"')
        self.send_header("X-Repo-Commit", repo.tags.get(revision, repo.head if revision == "main" else revision))
        self.end_headers()
        if method == "GET":
            self.wfile.write(data)

    def do_POST(self) -> None:
        self._handle("POST")

    def _route(self, method: str, path: str, body: bytes) -> None:
        hub = self.server
        if method == "POST" and path == "/api/repos/create":
            req = json.loads(body)
            repo_id = f"{req['organization']}/{req['name']}"
            assert req["type"] == "dataset"
            if repo_id in hub.repos:
                return self._reply(409, {"error": "You already created this dataset repo", "url": repo_id})
            repo = hub.repos[repo_id] = Repo(private=req.get("visibility") == "private")
            repo.commit({".gitattributes": GITATTRIBUTES}, "initial commit")
            return self._reply(200, {"url": f"{hub.url}/datasets/{repo_id}"})
        if method == "POST" and path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            try:
                yaml.safe_load(content.split("---", 2)[1])
            except Exception as e:
                return self._reply(400, {"errors": [{"message": str(e)}]})
            return self._reply(200, {"errors": [], "warnings": []})
        parts = path.split("/")  # '', 'api', 'datasets', org, name[, action, revision, rest...]
        if method in ("GET", "HEAD") and parts[1:2] == ["datasets"] and parts[4:5] == ["resolve"]:
            return self._file(method, hub.repos[f"{parts[2]}/{parts[3]}"], unquote(parts[5]), "/".join(parts[6:]))
        if parts[:3] != ["", "api", "datasets"] or len(parts) < 5:
            return self._reply(404, {"error": f"no route {method} {path}"})
        repo_id, action = f"{parts[3]}/{parts[4]}", parts[5] if len(parts) > 5 else "revision"
        repo = hub.repos[repo_id]
        revision = unquote(parts[6]) if len(parts) > 6 else "main"
        if method == "GET" and action == "refs":
            return self._reply(200, {
                "branches": [{"name": "main", "ref": "refs/heads/main", "targetCommit": repo.head}],
                "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": s} for t, s in repo.tags.items()],
                "converts": [],
            })
        if method == "GET" and action == "revision":
            files = repo.files_at(revision)
            sha = repo.tags.get(revision, repo.head if revision == "main" else revision)
            return self._reply(200, {"id": repo_id, "sha": sha, "private": repo.private,
                                     "siblings": [{"rfilename": p} for p in sorted(files or {})]})
        if method == "GET" and action == "tree":
            files = repo.files_at(revision)
            if files is None:
                return self._reply(404, {"error": "revision not found"}, {"X-Error-Code": "RevisionNotFound"})
            return self._reply(200, tree_entries(files, "/".join(parts[7:]), self.query.get("recursive") == ["true"]))
        if method == "POST" and action == "preupload":
            current = repo.files_at(revision) or {}
            return self._reply(200, {"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                 "oid": git_blob_sha1(current[f["path"]]) if f["path"] in current else None}
                for f in json.loads(body)["files"]
            ]})
        if method == "POST" and action == "commit":
            assert revision == "main"
            files = dict(repo.files_at("main"))
            message = ""
            for line in body.splitlines():
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    message = value["summary"]
                elif key == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    del files[value["path"]]
                else:  # lfsFile, deletedFolder, copies: not offered by this server
                    return self._reply(400, {"error": f"unsupported commit operation {key}"})
            sha = repo.commit(files, message)
            return self._reply(200, {"commitUrl": f"{hub.url}/datasets/{repo_id}/commit/{sha}",
                                     "commitOid": sha, "pullRequestUrl": None})
        if method == "POST" and action == "tag":
            tag = json.loads(body)["tag"]
            if tag in repo.tags:
                return self._reply(409, {"error": f"tag {tag} already exists"})
            repo.tags[tag] = repo.tags.get(revision, repo.head if revision == "main" else revision)
            return self._reply(200, {})
        return self._reply(404, {"error": f"no route {method} {path}"})


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    from huggingface_hub import constants

    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets offline mode for everything else
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    yield server
    server.shutdown()
    server.server_close()


REPO = "org/tiny-neurons"


def repackage(tiny_run: Path, dest: Path, repo: str | None = REPO, **package_keys: Any) -> Path:
    """A copy of the tiny run packaged again for `repo` (the card names it) with other
    package.* keys; returns its dataset folder."""
    from builder.config import recipe_from_dict
    from builder.package import PackageStage
    from builder.run import Manifest, RunContext, RunDir

    run = Path(shutil.copytree(tiny_run, dest))
    manifest = Manifest.load(run / "manifest.json")
    data = dict(manifest.recipe)
    data["package"] = {**data["package"], **package_keys}
    data["publish"] = {**data["publish"], "repo": repo}
    PackageStage().run(RunContext(recipe_from_dict(data), RunDir(run), manifest))
    return run / "dataset"


@pytest.fixture(scope="module")
def for_hub(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny dataset packaged for REPO (shared: copy it before changing it)."""
    return repackage(tiny_run, tmp_path_factory.mktemp("for-hub") / "run")


def copy_dataset(dataset: Path, dest: Path) -> Path:
    return Path(shutil.copytree(dataset, dest))


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_publish_commits_once_tags_and_never_leaks_the_token(hub: FakeHub, for_hub: Path, tmp_path: Path) -> None:
    folder = copy_dataset(for_hub, tmp_path / "dataset")
    result = publish_dataset(folder, repo="org/tiny-neurons")
    repo = hub.repos["org/tiny-neurons"]
    assert result.committed and result.tag_created and result.tag == "v0.1.0"
    assert repo.tags == {"v0.1.0": result.commit} and repo.head == result.commit
    assert len(hub.calls("POST", "/commit/")) == 1 and len(repo.commits) == 2  # the repo's first commit + ours
    remote = repo.files_at("v0.1.0")
    assert remote == {".gitattributes": GITATTRIBUTES, **local_files(folder)}
    assert {"README.md", "recipe.json", "build_info.json", "neurons/train-00000-of-00001.parquet"} <= set(remote)
    assert "published org/tiny-neurons v0.1.0" in result.summary()

    # the same folder again: no upload, no commit, no tag request
    n_requests = len(hub.requests)
    again = publish_dataset(folder, repo="org/tiny-neurons")
    assert not again.committed and not again.tag_created and again.commit == result.commit
    sent = hub.requests[n_requests:]
    assert not [r for r in sent if r.method == "POST" and any(a in r.path for a in ("/commit/", "/preupload/", "/tag/"))]
    assert len(repo.commits) == 2 and "already published" in again.summary()

    # a publish cut off after its commit (the tag never made it): upload_folder finds every file
    # unchanged and makes no commit; the tag lands on the existing commit
    del repo.tags["v0.1.0"]
    resumed = publish_dataset(folder, repo="org/tiny-neurons")
    assert not resumed.committed and resumed.tag_created and resumed.commit == result.commit
    assert len(hub.calls("POST", "/commit/")) == 1 and repo.tags == {"v0.1.0": result.commit}
    assert len(hub.calls("POST", "/preupload/")) == 2  # it did ask, and was told nothing changed

    # the token travels only in the Authorization header: never in a body, a stored file or the folder
    secret = TOKEN.encode()
    assert all(secret not in r.body for r in hub.requests)
    assert all(secret not in data for _, files in repo.commits for data in files.values())
    assert all(secret not in data for data in local_files(folder).values())
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)


LOAD_EVERY_CONFIG = """
import json, sys
from datasets import load_dataset
repo, revision, configs = sys.argv[1], sys.argv[2], sys.argv[3:]
out = {}
for config in configs:
    d = load_dataset(repo, config, split="train", revision=revision)
    out[config] = [d.num_rows, sorted(d.column_names)]
print(json.dumps(out))
"""


def test_a_published_version_loads_with_load_dataset(hub: FakeHub, for_hub: Path, tmp_path: Path) -> None:
    """What every user runs: `load_dataset("org/name", config, revision="vX.Y.Z")` against the
    Hub the dataset was published to, for every config in its card (in a fresh process: the
    Hub libraries read HF_ENDPOINT when they are imported)."""
    folder = copy_dataset(for_hub, tmp_path / "dataset")
    publish_dataset(folder, repo=REPO)
    card = yaml.safe_load((folder / "README.md").read_text().split("---", 2)[1])
    configs = [c["config_name"] for c in card["configs"]]
    assert {"neurons", "layers", "samples"} <= set(configs)
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf-home"),
           "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    done = subprocess.run([sys.executable, "-c", LOAD_EVERY_CONFIG, REPO, "v0.1.0", *configs], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    for config in configs:
        local = pq.read_table(sorted((folder / config).glob("*.parquet")))
        assert loaded[config] == [local.num_rows, sorted(local.column_names)], config
    assert hub.calls("GET", f"/datasets/{REPO}/resolve/v0.1.0/README.md")  # from the Hub, at the tag


def test_an_invalid_dataset_is_not_sent(hub: FakeHub, for_hub: Path, tmp_path: Path) -> None:
    folder = copy_dataset(for_hub, tmp_path / "dataset")
    (path,) = (folder / "neurons").glob("*.parquet")
    table = pq.read_table(path)
    rows = table.to_pylist()
    rows[0]["p_visual"] = 2.0
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    with pytest.raises(PublishError, match=r"failed \d+ validation checks, nothing was sent .*p_visual in \[0, 1\]"):
        publish_dataset(folder, repo="org/tiny-neurons")
    assert hub.requests == [] and hub.repos == {}
    result = CliRunner().invoke(app, ["publish", str(folder), "--repo", "org/tiny-neurons"])
    assert result.exit_code == 1 and "nothing was sent" in result.output and hub.requests == []


def test_a_tag_is_never_moved_and_stale_shards_go(hub: FakeHub, tiny_run: Path, for_hub: Path, tmp_path: Path) -> None:
    sharded = repackage(tiny_run, tmp_path / "sharded", max_shard_mb=0.05, row_group_mb=0.01)
    shards = sorted(p.name for p in (sharded / "neurons").glob("*.parquet"))
    assert len(shards) > 1
    first = publish_dataset(sharded, repo="org/tiny-neurons")
    # other files under the same version: refused, nothing committed
    single = copy_dataset(for_hub, tmp_path / "single")
    n_commits = len(hub.calls("POST", "/commit/"))
    with pytest.raises(PublishError, match=r"tag v0.1.0 already exists on org/tiny-neurons .*\+neurons/train-00000-of-00001"):
        publish_dataset(single, repo="org/tiny-neurons")
    assert len(hub.calls("POST", "/commit/")) == n_commits
    # a new version is one commit that also deletes the shards the folder no longer has
    bumped = repackage(tiny_run, tmp_path / "bumped", version="0.2.0")
    with pytest.raises(PublishError, match=r"--version 0.3.0 differs from the dataset's version 0.2.0"):
        publish_dataset(bumped, repo="org/tiny-neurons", version="0.3.0")
    second = publish_dataset(bumped, repo="org/tiny-neurons", version="0.2.0")
    repo = hub.repos["org/tiny-neurons"]
    assert second.committed and len(hub.calls("POST", "/commit/")) == n_commits + 1
    assert repo.tags == {"v0.1.0": first.commit, "v0.2.0": second.commit}
    remote = repo.files_at("v0.2.0")
    assert sorted(p for p in remote if p.startswith("neurons/")) == ["neurons/train-00000-of-00001.parquet"]
    assert remote == {".gitattributes": GITATTRIBUTES, **local_files(bumped)}
    assert sorted(p for p in repo.files_at("v0.1.0") if p.startswith("neurons/")) == [f"neurons/{s}" for s in shards]


def test_build_push_to_hub(hub: FakeHub, tiny_run: Path, tmp_path: Path) -> None:
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    result = CliRunner().invoke(app, ["--recipe", "tiny", "--out", str(run), "--push-to-hub", "org/pushed"])
    assert result.exit_code == 0, result.output
    assert "published org/pushed v0.1.0" in result.output
    repo = hub.repos["org/pushed"]
    readme = repo.files_at("v0.1.0")["README.md"].decode()
    assert 'load_dataset("org/pushed", "neurons", split="train", revision="v0.1.0")' in readme  # the card names the repo
    assert repo.files_at("v0.1.0")["README.md"] == (run / "dataset" / "README.md").read_bytes()
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    assert stages["package"]["status"] == "done" and stages["validate"]["status"] == "done"
    written = [p for p in run.rglob("*") if p.is_file()]  # manifest, logs, caches, the dataset: no token
    assert written and all(TOKEN.encode() not in p.read_bytes() for p in written)
    assert all(TOKEN.encode() not in r.body for r in hub.requests)


def test_publish_command_and_errors(hub: FakeHub, tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    folder = run / "dataset"
    runner = CliRunner()
    result = runner.invoke(app, ["publish", str(folder)])  # the tiny recipe names no publish.repo
    assert result.exit_code == 1 and "--repo ORG/NAME is required" in result.output
    # A bare dataset folder built for another repo (or none) is refused: its card would name the wrong one.
    result = runner.invoke(app, ["publish", str(folder), "--repo", "org/cli"])
    assert result.exit_code == 1 and "built without a repo" in result.output and "publish.repo=org/cli" in result.output
    assert hub.repos == {}
    # Given the run directory, publish packages it again for the repo first (nothing else reruns).
    result = runner.invoke(app, ["publish", str(run), "--repo", "org/cli", "--private"])
    assert result.exit_code == 0, result.output
    assert "repackaged" in result.output and "published org/cli v0.1.0" in result.output
    assert hub.repos["org/cli"].private
    readme = hub.repos["org/cli"].files_at("v0.1.0")["README.md"].decode()
    assert 'load_dataset("org/cli", "neurons"' in readme and "ORG/NAME" not in readme
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    assert stages["capture"] == json.loads((tiny_run / "manifest.json").read_text())["stages"]["capture"]
    result = runner.invoke(app, ["publish", str(folder), "--repo", "not a repo"])
    assert result.exit_code == 1 and "expected a Hub dataset id like ORG/NAME" in result.output
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    n_requests = len(hub.requests)
    result = runner.invoke(app, ["publish", str(folder), "--repo", "org/cli"])
    assert result.exit_code == 1 and "no Hugging Face token" in result.output
    assert len(hub.requests) == n_requests
