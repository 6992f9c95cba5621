"""Hub ids resolve through a (fake, tmp_path) local Hugging Face cache offline; mistyped local
paths say "no such directory" and never reach the hub. No network is used."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from lors.checkpoint import locate
from lors.checkpoint.locate import looks_like_hub_id
from lors.checkpoint.reader import open_checkpoint
from lors.cli import main
from lors.errors import CheckpointError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(cache: Path, repo_id: str, model: Path) -> Path:
    """``model``'s files laid out as huggingface_hub caches ``repo_id`` at revision main."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = storage / "snapshots" / COMMIT
    shutil.copytree(model, snapshot)
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture()
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HOME", raising=False)


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_hub_id_opens_from_the_local_cache_offline(tiny_models, tmp_path, monkeypatch, offline,
                                                   variable):
    cache = tmp_path / ("hub" if variable == "HF_HUB_CACHE" else "home/hub")
    snapshot = fake_hub_cache(cache, "lors-test/tiny-whisper", tiny_models["base"])
    monkeypatch.setenv(variable, str(cache if variable == "HF_HUB_CACHE" else tmp_path / "home"))
    checkpoint = open_checkpoint("lors-test/tiny-whisper")
    assert checkpoint.aux_dir == snapshot
    assert checkpoint.meta == open_checkpoint(tiny_models["base"]).meta


def test_hub_id_as_merge_input_offline(tiny_models, tmp_path, monkeypatch, offline):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    fake_hub_cache(tmp_path / "hub", "lors-test/expert", tiny_models["experts"]["e0"])
    assert main(["merge", "--base", str(tiny_models["base"]), "--expert", "a=lors-test/expert",
                 "--method", "task_arithmetic", "--out", str(tmp_path / "m"), "--quiet"]) == 0


def test_uncached_hub_id_offline_says_how_to_get_it(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint("lors-test/missing")
    message = str(caught.value)
    assert message.startswith("lors-test/missing: not a local path")
    assert "not in the local Hugging Face cache" in message and "HF_HUB_OFFLINE is set" in message
    assert "hf download lors-test/missing" in message and str(tmp_path / "hub") in message
    assert "or pass a local directory" in message


@pytest.mark.parametrize("ref, kind", [
    ("./experts/de_asr", "directory"),
    ("experts/de-asr", "directory"),   # owner/name in form, but experts/ is a local folder
    ("runs/experts/de_asr", "directory"),
    ("/nowhere/at/all", "directory"),
    ("~/nowhere", "directory"),
    ("checkpoints/model.pt", "file"),
])
def test_mistyped_local_paths_never_reach_the_hub(tmp_path, monkeypatch, ref, kind):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "experts" / "fr_asr").mkdir(parents=True)
    monkeypatch.setattr(locate, "from_hub", lambda repo: pytest.fail(f"hub asked for {repo}"))
    assert not looks_like_hub_id(ref)
    with pytest.raises(CheckpointError, match=f"^{re.escape(ref)}: no such {kind}"):
        open_checkpoint(ref)


def test_missing_path_names_the_closest_sibling(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "experts" / "de_asr").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"did you mean experts/de_asr\?"):
        open_checkpoint("experts/de-asr")


def test_what_counts_as_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert looks_like_hub_id("openai/whisper-small")
    assert looks_like_hub_id("some-org/whisper.v2_ft")
    (tmp_path / "openai").mkdir()  # a local folder of that name: then it is a local path
    assert not looks_like_hub_id("openai/whisper-small")
    assert not looks_like_hub_id("a/b/c") and not looks_like_hub_id("whisper-small")
