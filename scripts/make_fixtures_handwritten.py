"""Hand-written fixtures for variants no producer here can write (any python with torch,
transformers, safetensors; e.g. /work/llmc-venv/bin/python).

    python scripts/make_fixtures_handwritten.py [NAME ...]

* GPTQ ``desc_act: true`` (v1 and ``gptq_v2``): auto-round never writes act-order, llmcompressor
  writes only compressed-tensors, and GPTQModel needs a GPU toolchain. The data follow the GPTQ
  act-order layout: columns are visited in a (seeded random) order ``perm``; column ``perm[i]``
  belongs to group ``i // g`` (``g_idx[perm[i]] = i // g``); each group gets RTN min/max scale
  and zero point over its members.
* compressed-tensors ``actorder: group`` (``weight_g_idx``): llmcompressor 0.14 removed it
  ("actorder='group' has been removed"); older releases wrote this layout.

The packing below is written from the formats' documentation with plain loops, independently of
the project's own packers, and the oracle is the documented formula
w[n, k] = (q[n, k] - zp[g_idx[k], n]) * s[g_idx[k], n] evaluated on the unpacked integers.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures_common import ORACLE_MODULES, base_model, fresh_dir, tidy, write_oracle  # noqa: E402

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# name: (kind, group size, symmetric, checkpoint_format)
VARIANTS = {
    "gptq_v1_asym_descact_g32": ("gptq", 32, False, "gptq"),
    "gptq_v2_sym_descact_g64": ("gptq", 64, True, "gptq_v2"),
    "ct_asym_actgroup_g32": ("ct", 32, False, None),
}


def act_order_quant(w: torch.Tensor, g: int, sym: bool, seed: int):
    """-> q [N, K] ints 0..15, zp [G, N] ints, s [G, N] fp16, g_idx [K]."""
    N, K = w.shape
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(K, generator=gen)
    g_idx = torch.empty(K, dtype=torch.int32)
    g_idx[perm] = (torch.arange(K) // g).to(torch.int32)
    G = K // g
    q = torch.empty(N, K, dtype=torch.int32)
    s = torch.empty(G, N, dtype=torch.float16)
    zp = torch.empty(G, N, dtype=torch.int32)
    wf = w.float()
    for j in range(G):
        cols = (g_idx == j).nonzero().flatten()
        x = wf[:, cols]
        if sym:
            sc = (x.abs().amax(1) / 7.5).clamp(min=1e-6).half()
            z = torch.full((N,), 8, dtype=torch.int32)
        else:
            mn, mx = x.amin(1).clamp(max=0), x.amax(1).clamp(min=0)
            sc = ((mx - mn) / 15).clamp(min=1e-6).half()
            z = torch.round(-mn / sc.float()).clamp(1, 15).to(torch.int32)  # v1 can't store 0
        s[j], zp[j] = sc, z
        q[:, cols] = torch.clamp(torch.round(x / sc.float()[:, None]) + z[:, None], 0, 15).to(torch.int32)
    return q, zp, s, g_idx


def pack_words(vals: torch.Tensor) -> torch.Tensor:
    """[..., 8*m] ints 0..15 -> int32 [..., m]: value i of each 8 at bits 4*i."""
    v = vals.to(torch.int64).reshape(*vals.shape[:-1], -1, 8)
    word = torch.zeros(v.shape[:-1], dtype=torch.int64)
    for i in range(8):
        word |= v[..., i] << (4 * i)
    word = torch.where(word >= 2**31, word - 2**32, word)
    return word.to(torch.int32)


def oracle_of(q, zp, s, g_idx):
    gi = g_idx.long()
    return (q.double() - zp.double().t()[:, gi]) * s.double().t()[:, gi]


def make(name: str) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind, g, sym, ckpt = VARIANTS[name]
    with tempfile.TemporaryDirectory() as tmp:
        base = base_model(Path(tmp) / "base")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        tok = AutoTokenizer.from_pretrained(base)
        out = fresh_dir(name)
        tok.save_pretrained(str(out))
        (out / "generation_config.json").write_text((Path(base) / "generation_config.json").read_text())
    tensors, oracle = {}, {}
    for mname, mod in model.named_modules():
        if not (isinstance(mod, torch.nn.Linear) and mname.split(".")[-1] in LINEARS):
            continue
        # GPTQ's act-order permutation depends only on the layer *input* (argsort of diag(H)),
        # so q/k/v share one g_idx and gate/up share one: vLLM fuses those layers.
        leaf = mname.split(".")[-1]
        shared = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up",
                  "up_proj": "gate_up"}.get(leaf, leaf)
        layer_no = int(mname.split(".")[2])
        seed = layer_no * 10 + ["qkv", "o_proj", "gate_up", "down_proj"].index(shared)
        q, zp, s, g_idx = act_order_quant(mod.weight.detach(), g, sym, seed=seed)
        if kind == "ct":
            s = s.to(torch.bfloat16)
        if mname in ORACLE_MODULES:
            oracle[mname + ".weight"] = oracle_of(q, zp, s, g_idx).float()
        if kind == "gptq":
            stored_zp = zp - 1 if ckpt == "gptq" else zp
            tensors[mname + ".qweight"] = pack_words(q).t().contiguous()  # [K/8, N]: along K
            tensors[mname + ".qzeros"] = pack_words(stored_zp)  # [G, N/8]: along N
            tensors[mname + ".scales"] = s
            tensors[mname + ".g_idx"] = g_idx
        else:
            tensors[mname + ".weight_packed"] = pack_words(q)  # [N, K/8] (signed code + 8)
            tensors[mname + ".weight_scale"] = s.t().contiguous()  # [N, G]
            tensors[mname + ".weight_zero_point"] = pack_words(zp).t().contiguous()  # [N/8, G]
            tensors[mname + ".weight_g_idx"] = g_idx
            tensors[mname + ".weight_shape"] = torch.tensor(list(mod.weight.shape), dtype=torch.int64)
    for k, v in model.state_dict().items():
        mod_name = k.rsplit(".", 1)[0]
        if not (mod_name.split(".")[-1] in LINEARS and k.endswith(".weight")):
            tensors[k] = v.contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    if kind == "gptq":
        cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": g,
                                      "desc_act": True, "sym": sym, "checkpoint_format": ckpt,
                                      "static_groups": False, "true_sequential": True,
                                      "damp_percent": 0.01, "lm_head": False}
    else:
        cfg["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "pack-quantized",
            "quantization_status": "compressed", "ignore": ["lm_head"],
            "config_groups": {"group_0": {
                "targets": ["Linear"], "input_activations": None, "output_activations": None,
                "format": "pack-quantized",
                "weights": {"num_bits": 4, "type": "int", "symmetric": sym, "strategy": "group",
                            "group_size": g, "actorder": "group", "dynamic": False}}}}
    (out / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    tidy(out)
    write_oracle(out, oracle, {"producer": "hand-written from the documented layout",
                               "variant": VARIANTS[name],
                               "oracle": "documented formula (q - zp[g_idx]) * s[g_idx]"})
    print(name, "->", out)


if __name__ == "__main__":
    for n in sys.argv[1:] or list(VARIANTS):
        make(n)
