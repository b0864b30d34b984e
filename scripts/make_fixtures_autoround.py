"""Write GPTQ, AWQ and AutoRound fixtures with auto-round (run in the producer venv).

    /work/producers-venv/bin/python scripts/make_fixtures_autoround.py [NAME ...]

auto-round (0.16.1) quantizes the tiny Llama with RTN (iters=0, fast on CPU) or a few tuning
iterations, and exports through its own packers: ``auto_gptq`` (quant_method gptq, v1 zp-1),
``auto_awq`` (quant_method awq) and its native ``auto_round`` packings. The oracle is
auto-round's own dequantization of the saved tensors: its torch QuantLinear forward on an
identity matrix (GPTQ layouts) or ``export_to_awq.utils.dequantize_gemm`` (AWQ layout).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures_common import (CALIB_TEXT, base_model, fresh_dir, linear_prefixes,  # noqa: E402
                                  read_safetensors, tidy, write_oracle)

# name: (export format, sym, group size, iters, layers kept in 16 bit)
VARIANTS = {
    "ar_gptq_sym_g128": ("auto_gptq", True, 128, 0, []),
    "ar_gptq_asym_g64": ("auto_gptq", False, 64, 2, []),
    "ar_gptq_sym_g32": ("auto_gptq", True, 32, 0, ["model.layers.1.mlp.down_proj"]),
    "ar_gptq_asym_ch": ("auto_gptq", False, -1, 0, []),
    "ar_awq_asym_g128": ("auto_awq", False, 128, 0, []),
    "ar_awq_sym_g64": ("auto_awq", True, 64, 0, []),
    "ar_native_sym_g64": ("auto_round", True, 64, 0, []),
    # (format "auto_round" with sym=False is silently exported as auto_round:auto_awq by
    # auto-round 0.16.1, so it is the same fixture kind as the next one.)
    "ar_native_awq_g128": ("auto_round:auto_awq", False, 128, 0, []),
    "ar_native_gptq_asym_g32": ("auto_round:auto_gptq", False, 32, 0, []),
}


def oracle_gptq(t: dict, prefix: str, bits: int, g: int, zp_minus_one: bool) -> torch.Tensor:
    if zp_minus_one:
        from auto_round_extension.torch.qlinear_torch_zp import QuantLinear
    else:
        from auto_round_extension.torch.qlinear_torch import QuantLinear
    qweight = t[prefix + ".qweight"]
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    # auto-round never writes act-order g_idx (it is k // g); its forward's g_idx branch slices
    # output columns by K (fine only when N == K), so take the plain grouped branch.
    gi = t.get(prefix + ".g_idx")
    if gi is not None:
        assert torch.equal(gi.long(), torch.arange(K) // (K if g == -1 else g)), prefix
    has_g_idx = False
    lin = QuantLinear(bits, g, K, N, bias=False, g_idx=has_g_idx)
    lin.qweight.copy_(qweight)
    lin.qzeros.copy_(t[prefix + ".qzeros"])
    lin.scales = t[prefix + ".scales"].to(torch.float32)  # exact products, no fp16 rounding
    if has_g_idx:
        lin.g_idx.copy_(t[prefix + ".g_idx"])
    lin.post_init()
    with torch.no_grad():
        return lin(torch.eye(K, dtype=torch.float32)).t().contiguous()  # [N, K]


def oracle_awq(t: dict, prefix: str, bits: int, g: int, K: int) -> torch.Tensor:
    from auto_round.export.export_to_awq.utils import dequantize_gemm

    qz = t.get(prefix + ".qzeros")
    w = dequantize_gemm(t[prefix + ".qweight"], qz, t[prefix + ".scales"].float(), bits,
                        K if g == -1 else g)
    return w.t().contiguous()


def make(name: str) -> None:
    import auto_round
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fmt, sym, g, iters, keep16 = VARIANTS[name]
    with tempfile.TemporaryDirectory() as tmp:
        base = base_model(Path(tmp) / "base")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(base)
        layer_config = {m: {"bits": 16} for m in keep16}
        ar = AutoRound(model, tok, bits=4, group_size=g, sym=sym, iters=iters,
                       dataset=CALIB_TEXT, seqlen=16, nsamples=8, batch_size=4,
                       layer_config=layer_config or None, disable_opt_rtn=True)
        ar.quantize_and_save(str(Path(tmp) / "out"), format=fmt)
        outs = [p.parent for p in (Path(tmp) / "out").rglob("config.json")]
        src = outs[0]
        out = fresh_dir(name)
        for p in src.iterdir():
            (out / p.name).write_bytes(p.read_bytes())
    tidy(out)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    t = read_safetensors(out)
    packing = cfg.get("packing_format", "")
    awq = cfg.get("quant_method") == "awq" or "awq" in packing
    zp_minus_one = cfg.get("quant_method") == "gptq" or packing == "auto_round:auto_gptq"
    oracle = {}
    for prefix in linear_prefixes(t, "qweight"):
        if awq:
            K = t[prefix + ".qweight"].shape[0]
            oracle[prefix + ".weight"] = oracle_awq(t, prefix, 4, g, K)
        else:
            oracle[prefix + ".weight"] = oracle_gptq(t, prefix, 4, g, zp_minus_one)
    write_oracle(out, oracle, {"producer": "auto-round", "version": auto_round.__version__,
                               "export_format": fmt, "sym": sym, "group_size": g,
                               "iters": iters, "kept_16bit": keep16,
                               "oracle": "auto-round's own dequantization"})
    print(name, "->", out, cfg)


if __name__ == "__main__":
    names = sys.argv[1:] or list(VARIANTS)
    failed = {}
    for n in names:
        try:
            make(n)
        except Exception as e:  # record which exports this auto-round cannot make
            failed[n] = f"{type(e).__name__}: {e}"
            print("FAILED", n, failed[n], file=sys.stderr)
    if failed:
        print(json.dumps(failed, indent=1))
