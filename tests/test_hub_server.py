"""The local Hub server against the real `huggingface_hub` and `transformers` clients: uploads, downloads into a
fresh cache, the Hub's error types, commit history, `push_to_hub` -> `from_pretrained`, and a subprocess client."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hub_server import DUMMY_TOKEN, LocalHub, closed_port_url, hub_env, point_clients_at

REPO = "user/folder"
BINARY = bytes(range(256)) * 3 + b"\0\r\n\xff"  # every byte value, NULs and CR/LF: survives only a byte-exact path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "upload"
    (root / "weights").mkdir(parents=True)
    (root / "README.md").write_text("# tiny\n")
    (root / "config.json").write_text('{"a": 1}\n')
    (root / "weights" / "blob.bin").write_bytes(BINARY)
    return root


def local_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def upload(local_hub: LocalHub, folder: Path) -> HfApi:
    api = HfApi(endpoint=local_hub.url, token=DUMMY_TOKEN)
    assert api.create_repo(REPO).repo_id == REPO
    api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="add files")
    return api


def test_upload_folder_then_download_into_a_fresh_cache(local_hub, folder, tmp_path):
    upload(local_hub, folder)
    assert local_hub.files(REPO) == local_files(folder)

    cache = tmp_path / "fresh_cache"
    downloaded = hf_hub_download(REPO, "weights/blob.bin", cache_dir=cache, endpoint=local_hub.url, token=DUMMY_TOKEN)
    assert Path(downloaded).read_bytes() == BINARY

    snapshot = Path(
        snapshot_download(REPO, cache_dir=tmp_path / "other_cache", endpoint=local_hub.url, token=DUMMY_TOKEN)
    )
    assert local_files(snapshot) == local_files(folder)
    # The upload went through the inline ("regular") path, so the server saw a preupload and one NDJSON commit.
    assert ("POST", f"/api/models/{REPO}/preupload/main") in local_hub.requests
    assert ("POST", f"/api/models/{REPO}/commit/main") in local_hub.requests


def test_missing_file_and_missing_repo_raise_the_hub_errors(local_hub, folder, tmp_path):
    upload(local_hub, folder)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "nope.txt", cache_dir=tmp_path, endpoint=local_hub.url, token=DUMMY_TOKEN)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/absent", "config.json", cache_dir=tmp_path, endpoint=local_hub.url, token=DUMMY_TOKEN)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(
            REPO, "config.json", revision="f" * 40, cache_dir=tmp_path, endpoint=local_hub.url, token=DUMMY_TOKEN
        )


def test_create_repo_conflicts_unless_exist_ok(local_hub):
    api = HfApi(endpoint=local_hub.url, token=DUMMY_TOKEN)
    assert api.create_repo("tiny").repo_id == "user/tiny"  # no namespace: the token's user, here "user"
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo("user/tiny")
    assert conflict.value.response.status_code == 409
    assert api.create_repo("user/tiny", exist_ok=True).repo_id == "user/tiny"


def test_commits_keep_history_and_tree_listing_follows_them(local_hub, folder, tmp_path):
    api = upload(local_hub, folder)
    first = api.model_info(REPO).sha
    api.delete_file("weights/blob.bin", repo_id=REPO)
    second = api.model_info(REPO).sha
    assert first != second and len(second) == 40
    assert sorted(local_hub.files(REPO)) == ["README.md", "config.json"]
    assert sorted(f.rfilename for f in api.model_info(REPO).siblings) == ["README.md", "config.json"]

    # The first commit is still addressable, as on the real Hub.
    old = hf_hub_download(
        REPO, "weights/blob.bin", revision=first, cache_dir=tmp_path, endpoint=local_hub.url, token=DUMMY_TOKEN
    )
    assert Path(old).read_bytes() == BINARY
    top = {entry.path for entry in api.list_repo_tree(REPO, revision=first)}
    assert top == {"README.md", "config.json", "weights"}
    assert [e.path for e in api.list_repo_tree(REPO, "weights", revision=first)] == ["weights/blob.bin"]
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree(REPO, "weights"))


@pytest.mark.parametrize("status", [500, 503, 403])
def test_outage_answers_every_request_with_its_status_until_lifted(local_hub, folder, status):
    api = upload(local_hub, folder)
    local_hub.outage = status
    for call in (lambda: api.model_info(REPO), lambda: api.create_repo("user/other")):
        with pytest.raises(HfHubHTTPError) as failure:
            call()
        assert failure.value.response.status_code == status
    local_hub.outage = None
    assert sorted(f.rfilename for f in api.model_info(REPO).siblings) == sorted(local_files(folder))


def test_closed_port_refuses_connections(tmp_path):
    """Nothing listens at `closed_port_url()`: the client fails with a connection error, not an HTTP status."""
    api = HfApi(endpoint=closed_port_url(), token=DUMMY_TOKEN)
    with pytest.raises(Exception) as failure:
        api.model_info(REPO, timeout=5)
    assert not isinstance(failure.value, HfHubHTTPError)
    assert "connect" in type(failure.value).__name__.lower() or "refused" in str(failure.value).lower()


def test_push_to_hub_then_from_pretrained_gives_equal_logits(local_hub, tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    model = LlamaForCausalLM(config).eval()
    input_ids = torch.tensor([[1, 5, 9, 33, 2]])

    with point_clients_at(local_hub):
        model.push_to_hub("user/tiny-llama")
        reloaded = AutoModelForCausalLM.from_pretrained("user/tiny-llama", cache_dir=tmp_path / "cache").eval()

    assert {"config.json", "model.safetensors", "README.md"} <= set(local_hub.files("user/tiny-llama"))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)


def test_point_clients_at_restores_the_clients(local_hub, monkeypatch):
    import huggingface_hub.constants as hf_constants
    import transformers.utils.hub as transformers_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    before = (
        hf_constants.ENDPOINT,
        hf_constants.HUGGINGFACE_CO_URL_TEMPLATE,
        hf_constants.HF_HUB_OFFLINE,
        transformers_hub._hf_api,
    )
    with point_clients_at(local_hub):
        assert transformers_hub.hf_api().endpoint == local_hub.url
        assert HfApi().endpoint == local_hub.url
    after = (
        hf_constants.ENDPOINT,
        hf_constants.HUGGINGFACE_CO_URL_TEMPLATE,
        hf_constants.HF_HUB_OFFLINE,
        transformers_hub._hf_api,
    )
    assert after[:3] == before[:3] and after[3] is before[3]
    assert "HF_TOKEN" not in os.environ


def test_a_subprocess_downloads_with_hub_env(local_hub, folder, tmp_path):
    upload(local_hub, folder)
    code = textwrap.dedent(f"""
        import sys
        from huggingface_hub import hf_hub_download
        path = hf_hub_download({REPO!r}, "weights/blob.bin")
        assert path.startswith(sys.argv[1]), path
        sys.stdout.buffer.write(open(path, "rb").read())
    """)
    hf_home = tmp_path / "child_home"
    result = subprocess.run(
        [sys.executable, "-c", code, str(hf_home)], env=hub_env(local_hub, hf_home), capture_output=True, timeout=60
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == BINARY
