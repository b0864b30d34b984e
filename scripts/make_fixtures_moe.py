"""Write mixture-of-experts int4 fixtures, each with its producer's own library.

    /work/llmc-venv/bin/python      scripts/make_fixtures_moe.py moe_ct_sym_g32 moe_ct_asym_g32 \\
        moe_qwen3_ct_asym_g32
    /work/producers-venv/bin/python scripts/make_fixtures_moe.py moe_ar_gptq_sym_g32 \\
        moe_ar_gptq_asym_g32 moe_ar_awq_asym_g32 moe_mixtral_ar_gptq_sym_g32 moe_qwen3_ar_asym_g32
    /work/hqq-venv/bin/python       scripts/make_fixtures_moe.py moe_hqq_g32

(With no names, it makes every variant whose producer is importable in the running venv.)

The base is the tiny random MoE of ``tests/tiny_model.py`` (``make_tiny_moe``: hidden 128,
4 experts of moe_intermediate 64, a shared expert of 128 and its gate, top-2, 2 layers, vocab
256), with lm_head scaled by LM_HEAD_GAIN as ``base_model()`` does. On disk the experts are per
expert: ``model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj`` (qwen2_moe) or
``model.layers.{l}.block_sparse_moe.experts.{e}.w{1,2,3}`` (mixtral). down_proj has K = 64, so
every variant uses group 32.

- ``moe_ct_*``: llmcompressor QuantizationModifier (RTN), custom W4A16 scheme with group 32,
  ignoring lm_head and the routers (``mlp.gate``, ``shared_expert_gate``); oracle =
  compressed-tensors' ``PackedQuantizationCompressor.decompress``.
- ``moe_ar_*`` / ``moe_mixtral_ar_*``: auto-round RTN (iters=0) exported as ``auto_gptq`` /
  ``auto_round:auto_gptq`` / ``auto_awq``; oracle = auto-round's QuantLinear forward on an
  identity (GPTQ layouts) or ``dequantize_gemm`` (AWQ), as in make_fixtures_autoround.py.
- ``moe_hqq_g32``: hqq through transformers 4.57 ``HqqConfig(nbits=4, group_size=32, axis=1)``;
  it quantizes every Linear but lm_head, the routers included. Oracle =
  ``HQQLinear.dequantize()``.

The oracle holds every quantized linear module of layer 0 (fp32, ``<module>.weight``; Mixtral: a
subset, see MIXTRAL_ORACLE, to stay under 1.5 MB). Each oracle weight is checked against the
float base weight (relative Frobenius error < 0.1) before the fixture is kept, which proves it
is a real dequantization of that weight.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures_common import (CALIB_TEXT, LM_HEAD_GAIN, VOCAB, fresh_dir,  # noqa: E402
                                  read_safetensors, tidy, write_oracle)

from tiny_model import make_tiny_moe  # noqa: E402  (make_fixtures_common put tests/ on sys.path)

G = 32
LAYER0 = "model.layers.0."
ROUTER_IGNORE = [r"re:.*mlp\.gate$", r"re:.*shared_expert_gate$"]

# Mixtral's experts are 4 x 3 x [256, 128] (make_tiny_moe's intermediate 256): an fp32 oracle of
# all of them would take the fixture past 1.5 MB, so its oracle keeps attention, every projection
# of expert 0 and expert 3's down projection (a second expert id).
MIXTRAL_ORACLE = ("self_attn.", ".experts.0.", ".experts.3.down_proj")

# name: (producer, arch, params)
VARIANTS = {
    "moe_ct_sym_g32": ("llmcompressor", "qwen2_moe", dict(sym=True)),
    "moe_ct_asym_g32": ("llmcompressor", "qwen2_moe", dict(sym=False)),
    "moe_ar_gptq_sym_g32": ("auto-round", "qwen2_moe", dict(fmt="auto_gptq", sym=True)),
    # auto-round 0.16.1 exports "auto_gptq" asym as quant_method gptq (v1, zp - 1)
    "moe_ar_gptq_asym_g32": ("auto-round", "qwen2_moe", dict(fmt="auto_gptq", sym=False)),
    "moe_ar_awq_asym_g32": ("auto-round", "qwen2_moe", dict(fmt="auto_awq", sym=False)),
    "moe_mixtral_ar_gptq_sym_g32": ("auto-round", "mixtral", dict(fmt="auto_gptq", sym=True)),
    "moe_hqq_g32": ("hqq", "qwen2_moe", dict()),
    # Qwen3-MoE with the plain recipe (ignore lm_head only): transformers 5 builds its router as
    # a module of its own (not nn.Linear), so it stays bf16 without being listed in "ignore",
    # while vLLM 0.32 builds that router with the quantization method
    "moe_qwen3_ct_asym_g32": ("llmcompressor", "qwen3_moe", dict(sym=False, ignore_routers=False)),
    "moe_qwen3_ar_asym_g32": ("auto-round", "qwen3_moe", dict(fmt="auto_round", sym=False)),
}


def base_moe_model(tmp, arch: str = "qwen2_moe", seed: int = 0) -> Path:
    """The float tiny MoE (bf16 on disk), lm_head scaled by LM_HEAD_GAIN like base_model()."""
    from safetensors.torch import load_file, save_file

    path = make_tiny_moe(Path(tmp), arch, vocab=VOCAB, seed=seed)
    f = path / "model.safetensors"
    sd = load_file(str(f))
    lm = sd["lm_head.weight"]
    sd["lm_head.weight"] = (lm.float() * LM_HEAD_GAIN).to(lm.dtype)
    save_file(sd, str(f), metadata={"format": "pt"})
    return path


def layer0_prefixes(tensors: dict, suffix: str) -> list[str]:
    return sorted(k[: -len(suffix) - 1] for k in tensors
                  if k.startswith(LAYER0) and k.endswith("." + suffix))


def _mixtral_base_name(k: str) -> str:
    for hf, old in ((".gate_proj.", ".w1."), (".up_proj.", ".w3."), (".down_proj.", ".w2.")):
        k = k.replace(hf, old)
    return k


def check_oracle(oracle: dict, base_sd: dict, limit: float = 0.1) -> dict:
    """Relative error of each oracle weight against the float base weight of the same name."""
    errs = {}
    for k, w in oracle.items():
        # auto-round 0.16.1 + transformers 5 write Mixtral experts as {gate,up,down}_proj, the
        # float checkpoint as w1/w3/w2 (vLLM 0.32's Mixtral mapper renames the former)
        ref = base_sd[k if k in base_sd else _mixtral_base_name(k)].float()
        assert w.shape == ref.shape, (k, tuple(w.shape), tuple(ref.shape))
        errs[k] = float((w.float() - ref).norm() / ref.norm())
    bad = {k: e for k, e in errs.items() if not e < limit}
    assert not bad, f"oracle far from the base weights: {bad}"
    return errs


def copy_tree(src: Path, out: Path) -> None:
    for p in src.iterdir():
        if p.is_file():
            (out / p.name).write_bytes(p.read_bytes())


# ------------------------------------------------------------------------------- llmcompressor
def make_ct(name: str, arch: str, sym: bool, ignore_routers: bool = True):
    import compressed_tensors
    import llmcompressor
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        base = base_moe_model(Path(tmp) / "base", arch)
        base_sd = load_file(str(base / "model.safetensors"))
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        tok = AutoTokenizer.from_pretrained(base)
        # the preset "W4A16" is group 128; down_proj has K = 64, so a custom group-32 scheme
        wargs = dict(num_bits=4, type="int", symmetric=sym, strategy="group", group_size=G)
        scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**wargs))
        kw = dict(config_groups={"group_0": scheme},
                  ignore=["lm_head"] + (ROUTER_IGNORE if ignore_routers else []))
        oneshot(model=model, recipe=QuantizationModifier(**kw), processor=tok)
        out = fresh_dir(name)
        model.save_pretrained(str(out), save_compressed=True)
        tok.save_pretrained(str(out))
    tidy(out)
    t = read_safetensors(out)
    oracle = {}
    for prefix in layer0_prefixes(t, "weight_packed"):
        sd = {k.split(prefix + ".", 1)[1]: v for k, v in t.items() if k.startswith(prefix + ".")}
        sd["weight_scale"] = sd["weight_scale"].float()  # exact products in fp32
        dense = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]
        oracle[prefix + ".weight"] = dense.float()
    meta = {"producer": "llmcompressor", "version": llmcompressor.__version__,
            "compressed_tensors": compressed_tensors.__version__, "algorithm": "rtn",
            "weights": wargs, "ignore": kw["ignore"], "arch": arch,
            "oracle": "compressed-tensors' own decompression"}
    return out, oracle, meta, base_sd


# ---------------------------------------------------------------------------------- auto-round
def make_ar(name: str, arch: str, fmt: str, sym: bool):
    import auto_round
    from auto_round import AutoRound
    from make_fixtures_autoround import oracle_awq, oracle_gptq
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        base = base_moe_model(Path(tmp) / "base", arch)
        base_sd = load_file(str(base / "model.safetensors"))
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(base)
        ar = AutoRound(model, tok, bits=4, group_size=G, sym=sym, iters=0,
                       dataset=CALIB_TEXT, seqlen=16, nsamples=8, batch_size=4,
                       disable_opt_rtn=True)
        ar.quantize_and_save(str(Path(tmp) / "out"), format=fmt)
        src = [p.parent for p in (Path(tmp) / "out").rglob("config.json")][0]
        out = fresh_dir(name)
        copy_tree(src, out)
    tidy(out)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    t = read_safetensors(out)
    packing = cfg.get("packing_format", "")
    awq = cfg.get("quant_method") == "awq" or "awq" in packing
    zp_minus_one = cfg.get("quant_method") == "gptq" or packing == "auto_round:auto_gptq"
    oracle = {}
    for prefix in layer0_prefixes(t, "qweight"):
        if arch == "mixtral" and not any(s in prefix for s in MIXTRAL_ORACLE):
            continue
        if awq:
            K = t[prefix + ".qweight"].shape[0]
            oracle[prefix + ".weight"] = oracle_awq(t, prefix, 4, G, K)
        else:
            oracle[prefix + ".weight"] = oracle_gptq(t, prefix, 4, G, zp_minus_one)
    meta = {"producer": "auto-round", "version": auto_round.__version__, "export_format": fmt,
            "sym": sym, "group_size": G, "iters": 0, "arch": arch,
            "oracle": "auto-round's own dequantization"}
    if arch == "mixtral":
        meta["oracle_modules"] = sorted(k[:-len(".weight")] for k in oracle)
    return out, oracle, meta, base_sd


# ----------------------------------------------------------------------------------------- hqq
def make_hqq(name: str, arch: str):
    import hqq
    import transformers
    from hqq.core.quantize import HQQLinear
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, HqqConfig

    with tempfile.TemporaryDirectory() as tmp:
        base = base_moe_model(Path(tmp) / "base", arch)
        base_sd = load_file(str(base / "model.safetensors"))
        model = AutoModelForCausalLM.from_pretrained(
            base, dtype=torch.bfloat16, device_map="cpu",
            quantization_config=HqqConfig(nbits=4, group_size=G, axis=1))
        tok = AutoTokenizer.from_pretrained(base)
        out = fresh_dir(name)
        model.save_pretrained(str(out))
        tok.save_pretrained(str(out))
    oracle, not_hqq = {}, []
    for mname, mod in model.named_modules():
        if not mname.startswith(LAYER0):
            continue
        if isinstance(mod, HQQLinear):
            oracle[mname + ".weight"] = mod.dequantize().float()
        elif isinstance(mod, torch.nn.Linear):
            not_hqq.append(mname)
    tidy(out)
    meta = {"producer": "hqq via transformers HqqConfig",
            "hqq": getattr(hqq, "__version__", "0.2.8"), "transformers": transformers.__version__,
            "nbits": 4, "group_size": G, "axis": 1, "arch": arch,
            "layer0_linears_left_float": not_hqq,
            "oracle": "hqq's own HQQLinear.dequantize()"}
    return out, oracle, meta, base_sd


def make(name: str) -> None:
    producer, arch, params = VARIANTS[name]
    if producer == "llmcompressor":
        out, oracle, meta, base_sd = make_ct(name, arch, **params)
    elif producer == "auto-round":
        out, oracle, meta, base_sd = make_ar(name, arch, **params)
    else:
        out, oracle, meta, base_sd = make_hqq(name, arch, **params)
    assert oracle, f"{name}: no quantized module in layer 0"
    errs = check_oracle(oracle, base_sd)
    meta["max_rel_err_vs_base"] = round(max(errs.values()), 4)
    write_oracle(out, oracle, meta)
    cfg = json.loads((out / "config.json").read_text()).get("quantization_config")
    print(name, "->", out, f"{len(oracle)} oracle modules, max rel err {max(errs.values()):.4f}",
          json.dumps(cfg)[:800])


def _available(producer: str) -> bool:
    import importlib.util
    mod = {"llmcompressor": "llmcompressor", "auto-round": "auto_round", "hqq": "hqq"}[producer]
    if producer == "auto-round" and importlib.util.find_spec("llmcompressor"):
        return False  # the llmcompressor venv carries an older auto-round as a dependency
    return importlib.util.find_spec(mod) is not None


if __name__ == "__main__":
    names = sys.argv[1:] or [n for n, v in VARIANTS.items() if _available(v[0])]
    failed = {}
    for n in names:
        try:
            make(n)
        except Exception as e:  # record what a producer cannot make
            failed[n] = f"{type(e).__name__}: {e}"
            print("FAILED", n, failed[n], file=sys.stderr)
    if failed:
        print(json.dumps(failed, indent=1))
        sys.exit(1)
