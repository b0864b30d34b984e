"""HQQ 4-bit checkpoints of SmolLM2-135M-Instruct for the accuracy table (hqq venv).

    HF_HUB_OFFLINE=1 /work/hqq-venv/bin/python benchmarks/producers/hqq_smollm2.py \
        --src /work/e2e-models/smollm2-bf16 --out-root /work/accuracy-models --groups 32 64 128

hqq 0.2.8 through transformers 4.57's ``HqqConfig(nbits=4, group_size=G, axis=1)``: the model is
quantized on load (CPU, bf16) and written by ``save_pretrained`` as safetensors with
``quant_method: hqq`` -- the layout the plugin loads. lm_head (tied to the embedding) stays float.
Writes ``<out-root>/hqq-g{G}`` with the source's tokenizer files. HQQ needs no calibration data;
``--calib`` is accepted for a uniform command line and ignored.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parser, publish, run_groups, setup_offline  # noqa: E402

setup_offline(datasets=False)


def quantize(src: Path, out: Path, group: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, HqqConfig

    model = AutoModelForCausalLM.from_pretrained(
        src, dtype=torch.bfloat16, device_map="cpu",
        quantization_config=HqqConfig(nbits=4, group_size=group, axis=1))

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))

    publish(out, write, src)


def main() -> None:
    args = parser(__doc__, calib_required=False,
                  calib_help="ignored: HQQ is calibration-free").parse_args()
    run_groups(args, "hqq-g", lambda out, g: quantize(args.src, out, g))


if __name__ == "__main__":
    main()
