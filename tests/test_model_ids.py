"""Hugging Face model ids (``org/name``, ``--revision``) for quantize, inspect and convert,
resolved with huggingface-hub from a local cache built here in the layout it reads
(``models--org--name/{blobs,refs,snapshots}``), offline: nothing is downloaded."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_int4xpu.errors import Int4FormatError
from vllm_int4xpu.hub import looks_like_model_id, resolve_model

FIXTURES = Path(__file__).parent / "fixtures"


def add_to_cache(hf_home: Path, repo_id: str, src: Path, revision: str = "main",
                 commit: str | None = None) -> Path:
    """Put the files of ``src`` into ``hf_home``'s hub cache as snapshot ``commit`` of
    ``repo_id`` with ``refs/<revision>`` pointing at it; files are symlinks into blobs/."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = commit or hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for f in src.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            if not blob.exists():
                shutil.copyfile(f, blob)
            link = snap / f.relative_to(src)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snap


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def _env(home: Path) -> dict:
    env = dict(os.environ, HF_HOME=str(home), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    return env


def test_model_id_syntax():
    assert looks_like_model_id("HuggingFaceTB/SmolLM2-135M-Instruct")
    for s in ("./org/name", "/abs/path", "org", "org/name/extra", "~/x/y"):
        assert not looks_like_model_id(s), s


def test_resolves_main_and_a_revision_offline(offline_hub, tiny_dir, tmp_path):
    snap = add_to_cache(offline_hub, "acme/tiny", tiny_dir)
    other = add_to_cache(offline_hub, "acme/tiny", tiny_dir, revision="v2")
    assert resolve_model("acme/tiny") == snap
    assert resolve_model("acme/tiny", revision="v2") == other
    assert (resolve_model("acme/tiny") / "config.json").exists()
    with pytest.raises(Int4FormatError, match="not found in the local Hugging Face cache"):
        resolve_model("acme/absent")
    with pytest.raises(Int4FormatError, match="revision nope not found"):
        resolve_model("acme/tiny", revision="nope")
    with pytest.raises(Int4FormatError, match="applies to a model id"):
        resolve_model(tiny_dir, revision="main")


def test_cli_quantize_inspect_convert_take_model_ids(offline_hub, tiny_dir, tmp_path):
    add_to_cache(offline_hub, "acme/tiny", tiny_dir)
    add_to_cache(offline_hub, "acme/tiny-hqq", FIXTURES / "hqq_qmodel_g64")
    env = _env(offline_hub)
    cli = [sys.executable, "-m", "vllm_int4xpu.cli"]
    r = subprocess.run(cli + ["quantize", "acme/tiny", str(tmp_path / "q"), "--quiet"],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    add_to_cache(offline_hub, "acme/tiny-int4", tmp_path / "q")
    r = subprocess.run(cli + ["inspect", "acme/tiny-int4"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "int4xpu" in r.stdout and "14" in r.stdout
    r = subprocess.run(cli + ["convert", "acme/tiny-hqq", str(tmp_path / "c"), "--quiet"],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "c" / "model.safetensors").exists()
    # a model id that is not cached, offline: a clear error and no output
    r = subprocess.run(cli + ["quantize", "acme/absent", str(tmp_path / "x"), "--quiet"],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "acme/absent" in r.stderr and "HF_HUB_OFFLINE" in r.stderr
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp-*"))
