"""Publishing a dataset folder to the Hugging Face Hub: validate, one commit, one version tag.

`publish_dataset(folder, repo)`:

1. validates the folder and refuses to send anything when a check fails;
2. creates the dataset repo if needed;
3. if the tag `v<version>` exists already: does nothing when the tagged files are the
   folder's files (so publishing twice makes no commit), refuses when they differ;
4. otherwise uploads the folder as one commit with `upload_folder` (unchanged files are
   skipped; parquet shards and plots the folder no longer has are deleted in the same
   commit) and tags that commit.

The token comes from `HF_TOKEN` or the user's `hf auth login`; it is only ever handed to
`huggingface_hub` and never written. `HF_ENDPOINT` points at another Hub (tests use a
server on 127.0.0.1).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from builder.errors import BuilderError

log = logging.getLogger("builder")

DELETE_PATTERNS = ["*.parquet", "plots/*"]
"""Remote files that are deleted when the folder no longer has them (stale shards, old plots)."""
MAX_FILES = 250
"""`upload_folder` commits at most this many files at once; more would split the upload into
several commits (and the tag could not name one commit holding the whole dataset)."""
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
VERSION = re.compile(r"^\d+\.\d+\.\d+$")


class PublishError(BuilderError):
    """The dataset cannot be published (invalid folder, no token, tag conflict, Hub error)."""


@dataclass(frozen=True)
class PublishResult:
    """What a publish did."""

    repo: str
    """`org/name` of the dataset repo."""
    version: str
    tag: str
    """`v<version>`, pointing at `commit`."""
    commit: str
    """The commit holding this version of the dataset."""
    committed: bool
    """True when this publish made a new commit (False: the Hub had these files already)."""
    tag_created: bool
    """True when this publish created the tag (False: it already pointed at these files)."""
    files: int
    """Files in the published folder."""
    url: str
    """Where to browse this version."""

    def summary(self) -> str:
        if not self.committed and not self.tag_created:
            return f"{self.repo} {self.tag} is already published at {self.commit[:12]} (nothing sent): {self.url}"
        what = f"new commit {self.commit[:12]}" if self.committed else f"unchanged files at {self.commit[:12]}"
        return f"published {self.repo} {self.tag} ({self.files} files, {what}): {self.url}"


def local_files(folder: Path) -> dict[str, Path]:
    """The files `upload_folder` sends, by path in the repo."""
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


def tagged_differences(api, repo: str, revision: str, folder: Path) -> list[str]:
    """How the repo at `revision` differs from the folder (`+new`, `-gone`, `~changed` paths)."""
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils import filter_repo_objects
    from huggingface_hub.utils.sha import git_hash

    remote = {f.path: f for f in api.list_repo_tree(repo, repo_type="dataset", revision=revision, recursive=True)
              if isinstance(f, RepoFile) and f.path != ".gitattributes"}
    local = local_files(folder)
    out = [f"+{p}" for p in sorted(set(local) - set(remote))]
    out += [f"-{p}" for p in filter_repo_objects(sorted(set(remote) - set(local)), allow_patterns=DELETE_PATTERNS)]
    for path in sorted(set(local) & set(remote)):
        data = local[path].read_bytes()
        r = remote[path]
        same = (hashlib.sha256(data).hexdigest() == r.lfs.sha256) if r.lfs else (git_hash(data) == r.blob_id)
        if not same:
            out.append(f"~{path}")
    return out


def publish_settings(folder: Path) -> dict:
    """The `publish` section of the recipe a dataset folder was built with ({} without one)."""
    recipe_json = folder / "recipe.json"
    return (json.loads(recipe_json.read_text()).get("publish") or {}) if recipe_json.exists() else {}


def _check_inputs(folder: Path, repo: str, version: str | None) -> tuple[str, int]:
    """Validate the folder and the arguments; return the version and the number of files."""
    from builder.package.build_info import BuildInfo
    from validation import validate_dataset

    if not REPO_ID.match(repo):
        raise PublishError(f"--repo {repo!r}: expected a Hub dataset id like ORG/NAME")
    report = validate_dataset(folder)
    if not report.ok:
        failed = "; ".join(f"{c.name}: {c.detail}" for c in report.failures[:3])
        raise PublishError(
            f"{folder} failed {len(report.failures)} validation checks, nothing was sent ({failed}); "
            f"see `build-neuron-dataset validate {folder}`"
        )
    built_for = publish_settings(folder).get("repo")
    if built_for != repo:
        named = f"for {built_for}" if built_for else "without a repo (publish.repo unset)"
        raise PublishError(
            f"the dataset was built {named}, and its card's load snippet and citation name that; publish its run "
            f"directory instead (`build-neuron-dataset publish RUN_DIR --repo {repo}` packages it again for {repo}), "
            f"or rebuild with --set publish.repo={repo} (only package and validate run again)"
        )
    built = BuildInfo.read(folder).dataset_version
    version = version or built
    if not VERSION.match(version):
        raise PublishError(f"--version {version!r}: expected X.Y.Z")
    if version != built:
        raise PublishError(
            f"--version {version} differs from the dataset's version {built} (in its card and recipe.json); "
            f"rebuild with --set package.version={version}"
        )
    n_files = len(local_files(folder))
    if n_files > MAX_FILES:
        raise PublishError(
            f"{folder} has {n_files} files, more than the {MAX_FILES} one commit can hold; "
            "rebuild with a larger package.max_shard_mb"
        )
    return version, n_files


def transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors of the HTTP client huggingface_hub uses (httpx2 in 2.x, httpx in 1.x)."""
    import importlib

    errors: list[type[BaseException]] = [OSError]
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).HTTPError)
        except ImportError:
            continue
    return tuple(errors)


def hub_api():
    """An HfApi for `HF_ENDPOINT` (read now, not at import) with the user's token."""
    from huggingface_hub import HfApi, constants, get_token

    if constants.is_offline_mode():
        raise PublishError("HF_HUB_OFFLINE is set: unset it to publish")
    token = get_token()
    if not token:
        raise PublishError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)


def publish_dataset(path: str | Path, repo: str, version: str | None = None, private: bool = False) -> PublishResult:
    """Validate `path` (a dataset folder or its run directory), then commit and tag it on the Hub."""
    from huggingface_hub.errors import HfHubHTTPError

    from validation import resolve_dataset_dir

    folder = resolve_dataset_dir(path)
    version, n_files = _check_inputs(folder, repo, version)
    tag = f"v{version}"
    api = hub_api()
    url = f"{api.endpoint}/datasets/{repo}/tree/{tag}"
    try:
        api.create_repo(repo, repo_type="dataset", private=private, exist_ok=True)
        existing = next((t for t in api.list_repo_refs(repo, repo_type="dataset").tags if t.name == tag), None)
        if existing is not None:
            return _already_tagged(api, repo, version, existing.target_commit, folder, n_files, url)
        head = api.repo_info(repo, repo_type="dataset").sha
        log.info("publish: uploading %s to %s (%d files)", folder, repo, n_files)
        commit = api.upload_folder(
            repo_id=repo,
            repo_type="dataset",
            folder_path=folder,
            commit_message=f"Dataset {tag}",
            commit_description="Built and validated with build-neuron-dataset.",
            delete_patterns=DELETE_PATTERNS,
        )
        try:
            api.create_tag(repo, tag=tag, revision=commit.oid, repo_type="dataset", tag_message=f"Dataset {tag}")
        except HfHubHTTPError as e:
            if e.response is None or e.response.status_code != 409:
                raise
            # Someone tagged it between our check and now: fine only if it is this commit.
            raced = next(t for t in api.list_repo_refs(repo, repo_type="dataset").tags if t.name == tag)
            if raced.target_commit != commit.oid:
                raise PublishError(f"tag {tag} was just created on {repo} at another commit "
                                   f"({raced.target_commit[:12]}); publish under a new version") from e
    except HfHubHTTPError as e:
        raise PublishError(f"the Hub refused the publish of {repo}: {str(e).splitlines()[0]}") from e
    except transport_errors() as e:
        raise PublishError(f"cannot reach the Hub at {api.endpoint} ({type(e).__name__}: {e}); "
                           "check the network or HF_ENDPOINT") from e
    return PublishResult(repo, version, tag, commit.oid, committed=commit.oid != head, tag_created=True,
                         files=n_files, url=url)


def _already_tagged(api, repo: str, version: str, target: str, folder: Path, n_files: int,
                    url: str) -> PublishResult:
    """The tag exists: a no-op when it holds exactly these files, a refusal otherwise."""
    differences = tagged_differences(api, repo, target, folder)
    if differences:
        raise PublishError(
            f"tag v{version} already exists on {repo} at {target[:12]} with other files "
            f"({', '.join(differences[:4])}{', ...' if len(differences) > 4 else ''}); publish the change as a new "
            "version: rebuild with --set package.version=X.Y.Z"
        )
    return PublishResult(repo, version, f"v{version}", target, committed=False, tag_created=False,
                         files=n_files, url=url)
