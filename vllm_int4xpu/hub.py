"""Model sources: a local directory or a Hugging Face model id (``org/name``).

A model id is resolved with huggingface-hub's ``snapshot_download`` into its cache (``HF_HOME``,
``HF_HUB_CACHE``); with ``HF_HUB_OFFLINE=1`` only the cache is read (``refs/<revision>`` ->
``snapshots/<commit>/``) and nothing is fetched.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from .errors import Int4FormatError

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_TRUE = {"1", "on", "yes", "true"}


def looks_like_model_id(src: str) -> bool:
    return bool(_REPO_ID.match(src)) and not src.startswith((".", "/", "~"))


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def resolve_model(src: str | os.PathLike, revision: Optional[str] = None) -> Path:
    """A local directory as is; otherwise a model id resolved to its snapshot directory."""
    s = str(src)
    p = Path(s).expanduser()
    if p.exists():
        if revision is not None:
            raise Int4FormatError("--revision applies to a model id, not a local directory",
                                  file=s, expected="org/name --revision REV", found=s)
        return p.resolve()
    if not looks_like_model_id(s):
        raise Int4FormatError("no such model directory", file=s,
                              expected="a local model directory or a model id org/name",
                              found="missing path")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        path = snapshot_download(repo_id=s, revision=revision, cache_dir=cache_dir(),
                                 local_files_only=offline())
    except HFValidationError as e:
        raise Int4FormatError("not a valid model id", file=s, expected="org/name",
                              found=str(e).splitlines()[0]) from None
    except Exception as e:  # LocalEntryNotFoundError, RepositoryNotFoundError, network errors
        where = "the local Hugging Face cache (HF_HUB_OFFLINE=1)" if offline() else "the Hub"
        rev = f" at revision {revision}" if revision else ""
        raise Int4FormatError(f"model id{rev} not found in {where}", file=s,
                              expected=f"a snapshot under {cache_dir()}",
                              found=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                              ) from None
    return Path(path)


def cache_dir() -> str:
    """huggingface-hub's cache directory, read from the environment now (its own constant is
    fixed when it is first imported)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return os.path.join(home, "hub")
