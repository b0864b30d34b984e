"""Pieces shared by the checkpoint producers in this folder.

Each producer runs in its own virtualenv (producers, llmc, hqq), so this module uses the
standard library only. The scripts put their own folder first on ``sys.path`` and import it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


def setup_offline(datasets: bool = True) -> None:
    """Keep Hugging Face libraries off the network (call before importing them)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if datasets:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def split_documents(path: Path) -> list[str]:
    """The non-empty documents of a text file, split on lines equal to ``=====``."""
    docs, cur = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() == "=====":
            docs.append("\n".join(cur).strip())
            cur = []
        else:
            cur.append(line)
    docs.append("\n".join(cur).strip())
    return [d for d in docs if d]


def indivisible(src: Path, group: int) -> list[str]:
    """Linear input widths of the model that ``group`` does not divide."""
    cfg = json.loads((src / "config.json").read_text())
    widths = {"hidden_size": cfg["hidden_size"], "intermediate_size": cfg["intermediate_size"]}
    return [f"{k}={v}" for k, v in widths.items() if v % group]


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def publish(out: Path, write: Callable[[Path], Path | None], tokenizer_src: Path) -> None:
    """Write a checkpoint to ``out`` all at once: ``write(tmp)`` saves the model into the temporary
    folder ``tmp`` (next to ``out``) and returns the folder it ended up in when that is not
    ``tmp`` itself; the tokenizer files of ``tokenizer_src`` are added there, and that folder then
    replaces ``out``."""
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    made = write(tmp) or tmp
    copy_tokenizer(tokenizer_src, made)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(made, out)
    shutil.rmtree(tmp, ignore_errors=True)


def run_groups(args: argparse.Namespace, prefix: str, quantize: Callable[[Path, int], None],
               refuses: str | None = None) -> None:
    """``quantize(out, G)`` for each group G of ``args.groups``, out = ``<out-root>/<prefix>G``,
    timed. With ``refuses`` (why such groups cannot be made), a group that does not divide a
    linear input width of ``args.src`` is skipped with a message."""
    args.out_root.mkdir(parents=True, exist_ok=True)
    for g in args.groups:
        out = args.out_root / f"{prefix}{g}"
        bad = indivisible(args.src, g) if refuses else []
        if bad:
            print(f"skipping group {g}: it does not divide {', '.join(bad)}; {refuses}",
                  flush=True)
            continue
        t0 = time.time()
        quantize(out, g)
        print(f"{out}: {time.time() - t0:.1f}s", flush=True)


def parser(doc: str, calib_required: bool = True,
           calib_help: str = "text file, documents split by =====") -> argparse.ArgumentParser:
    """The options every producer takes: --src, --out-root, --groups, --calib."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--src", type=Path, default=Path("/work/e2e-models/smollm2-bf16"))
    ap.add_argument("--out-root", type=Path, default=Path("/work/accuracy-models"))
    ap.add_argument("--groups", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--calib", type=Path, required=calib_required, help=calib_help)
    return ap
