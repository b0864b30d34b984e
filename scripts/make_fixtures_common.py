"""Shared pieces of the fixture generators (run in a producer virtualenv, never the project's).

The fixtures under ``tests/fixtures/`` are written by each format's own producer library from
the tiny random Llama of ``tests/tiny_model.py`` (hidden 128, intermediate 256, 2 layers, vocab
256, offline word-level tokenizer), plus ``oracle/dequantized.safetensors``: the producer's
*own* dequantization of the quantized weights in ORACLE_MODULES (fp32, key ``<module>.weight``)
and ``oracle/meta.json`` (producer name/version and the variant's parameters). The oracle sits in
a subfolder because vLLM loads every top-level ``*.safetensors`` file of a model directory.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
sys.path.insert(0, str(REPO / "tests"))

from tiny_model import WORDS, make_tiny_llama  # noqa: E402

# Calibration text: sentences over the tokenizer's words (no dataset download).
CALIB_TEXT = [" ".join(WORDS[(i * 7) % len(WORDS):][:24] + WORDS[:(i % 5) + 3]) for i in range(16)]


# Oracle weights kept per fixture (fp32 is big; these cover every projection kind, column and
# row parallel, K = 128 and K = 256). The e2e tests check all layers through vLLM.
ORACLE_MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                  "model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.o_proj",
                  "model.layers.0.mlp.down_proj")
VOCAB = 256


LM_HEAD_GAIN = 8.0


def base_model(tmp: str | os.PathLike, seed: int = 0) -> Path:
    """The float tiny Llama every fixture starts from (bf16 on disk, vocab 256 to stay small).

    lm_head (never quantized) is scaled by LM_HEAD_GAIN so that next-token distributions are
    peaked: greedy tokens then differ between two correct int4 paths only at real near-ties.
    """
    from safetensors.torch import load_file, save_file

    path = make_tiny_llama(Path(tmp), seed=seed, vocab=VOCAB)
    f = path / "model.safetensors"
    sd = load_file(str(f))
    sd["lm_head.weight"] = (sd["lm_head.weight"].float() * LM_HEAD_GAIN).to(sd["lm_head.weight"].dtype)
    save_file(sd, str(f), metadata={"format": "pt"})
    return path


def fresh_dir(name: str) -> Path:
    out = FIXTURES / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    return out


def tidy(out: Path, keep=("config.json", "model.safetensors", "tokenizer.json",
                          "tokenizer_config.json", "special_tokens_map.json",
                          "generation_config.json", "oracle", "quantization_config.json")) -> None:
    """Drop producer side files (recipes, logs) so fixtures stay small."""
    for p in out.iterdir():
        if p.name not in keep:
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def write_oracle(out: Path, weights: dict, meta: dict) -> None:
    """Save the producer's dequantized weights (fp32) and what made them."""
    from safetensors.torch import save_file

    (out / "oracle").mkdir(exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in weights.items()},
              str(out / "oracle" / "dequantized.safetensors"))
    (out / "oracle" / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))


def read_safetensors(d: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def linear_prefixes(tensors: dict, suffix: str, only=ORACLE_MODULES) -> list[str]:
    found = sorted(k[: -len(suffix) - 1] for k in tensors if k.endswith("." + suffix))
    return [p for p in found if only is None or p in only]
