"""``vllm-int4xpu inspect CKPT_DIR``: what is this int4 checkpoint, is it sound, what would run it.

Reads ``config.json`` and the safetensors files only (no vLLM, no model code): detects the format
(GPTQ, AWQ, compressed-tensors, AutoRound, HQQ, torchao or native int4xpu), prints its zero-point
kind, bits, group size and act-order, then converts *every* quantized layer to the canonical
weight exactly as loading would (format hook, to_canonical, validate) and lists each problem
with file, tensor, expected and found. Finally it names the kernel backend that would run the
layers on this machine (:func:`vllm_int4xpu.kernels.select_kernel`). Exit status 0 = no problems.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from .errors import Int4FormatError
from .formats import LEGACY_CONFIG_FILES, LayerGeometry, parse_format, with_legacy_quant_method
from .formats.awq import AWQLayout
from .formats.compressed_tensors import CompressedTensorsFormat
from .formats.gptq import GPTQLayout
from .formats.hqq import HQQFormat
from .formats.native import NativeFormat
from .formats.torchao import TorchAOFormat
from .hub import looks_like_model_id, resolve_model
from .weight import PACK_FACTOR, Int4Weight


@dataclass
class Report:
    path: str
    fmt: Any = None
    description: dict = field(default_factory=dict)
    layers: int = 0
    unquantized_linears: list = field(default_factory=list)
    problems: list = field(default_factory=list)  # Int4FormatError instances
    specs: Counter = field(default_factory=Counter)
    backends: dict = field(default_factory=dict)  # spec description -> backend or refusal
    moe: dict = field(default_factory=dict)  # MoE layer prefix -> (experts, spec description)
    moe_backends: dict = field(default_factory=dict)  # MoE spec description -> backend
    dequantized_at_load: list = field(default_factory=list)  # quantized routers (see ROUTERS)


def _probe_geometry(fmt) -> tuple[int, int, int, int]:
    """A layer geometry every valid config of ``fmt`` accepts (to list its tensor names)."""
    g = fmt.group_size if isinstance(fmt.group_size, int) and fmt.group_size > 0 else 8
    K = 16 * g
    return K, 128, K, 128


def _primary_tensor(fmt) -> str:
    """Name of the packed-codes tensor that marks a quantized layer (first TensorSpec)."""
    return fmt.tensor_specs(LayerGeometry(*_probe_geometry(fmt)))[0].name


def _unreadable(fname: str, e: Exception, key: Optional[str] = None) -> Int4FormatError:
    return Int4FormatError("checkpoint file cannot be read", file=fname,
                           tensor=key or "(file header)", expected="a complete safetensors file",
                           found=f"{type(e).__name__}: {e}"[:300])


def _shape_pair(t: torch.Tensor, name: str) -> tuple[int, int]:
    """A layer's (N, K) from a metadata tensor holding them (HQQ .shape, CT .weight_shape)."""
    vals = t.reshape(-1).tolist() if not t.is_floating_point() else []
    if len(vals) != 2 or min(vals) <= 0:
        raise Int4FormatError("layer shape metadata is malformed", tensor=name,
                              expected="two positive integers (out, in)",
                              found=f"{t.dtype} {list(t.shape)} {vals[:4]}")
    return int(vals[0]), int(vals[1])


def infer_shape(fmt, t: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(K, N) of one layer from its whole on-disk tensors."""
    if isinstance(fmt, GPTQLayout):
        q = t["qweight"]
        return q.shape[0] * PACK_FACTOR, q.shape[1]
    if isinstance(fmt, AWQLayout):
        q = t["qweight"]
        return q.shape[0], q.shape[1] * PACK_FACTOR
    if isinstance(fmt, CompressedTensorsFormat):
        if "weight_shape" in t:
            n, k = _shape_pair(t["weight_shape"], "weight_shape")
            return k, n
        q = t["weight_packed"]
        return q.shape[1] * PACK_FACTOR, q.shape[0]
    if isinstance(fmt, HQQFormat):
        if "shape" in t:
            n, k = _shape_pair(t["shape"], "shape")
            return k, n
        raise Int4FormatError("hqq: layer has no .shape tensor", tensor="shape",
                              expected="int64 [2]", found=None)
    if isinstance(fmt, TorchAOFormat):
        q = t["_weight_qdata"]
        return q.shape[1] * (PACK_FACTOR if fmt.layout == "plain_int32" else 2), q.shape[0]
    if isinstance(fmt, NativeFormat):
        q = t["qweight"]
        return q.shape[1] * PACK_FACTOR, q.shape[0]
    raise Int4FormatError("inspect does not know this format's layout", found=type(fmt).__name__)


def config_shapes(model_cfg: dict) -> dict[str, tuple[int, int]]:
    """(K, N) of the usual decoder projections (``self_attn.q_proj`` ... ``mlp.down_proj``) from
    config.json (Llama/Mistral/Qwen naming).

    Like vLLM, inspect trusts the model config for layer sizes, so a truncated tensor is named
    as the one that is wrong. Unknown module names fall back to the tensors' own shapes.
    """
    c = model_cfg.get("text_config") or model_cfg
    try:
        h, inter = int(c["hidden_size"]), int(c["intermediate_size"])
        heads = int(c["num_attention_heads"])
        kv = int(c.get("num_key_value_heads") or heads)
        hd = int(c.get("head_dim") or h // heads)
    except (KeyError, TypeError, ValueError):
        return {}
    return {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd),
            "o_proj": (heads * hd, h), "gate_proj": (h, inter), "up_proj": (h, inter),
            "down_proj": (inter, h)}


def safetensors_files(path: str) -> list[str]:
    """The names of a checkpoint directory's safetensors files: those its index maps weights to,
    else every ``*.safetensors`` in it."""
    idx = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(idx):
        with open(idx) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    return sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))


def _model_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise Int4FormatError("no config.json in the checkpoint directory", file=cfg_path,
                              expected="config.json with quantization_config", found=None)
    with open(cfg_path) as f:
        return json.load(f)


def _load_config(path: str) -> dict:
    cfg = _model_config(path)
    q = cfg.get("quantization_config") or cfg.get("compression_config")
    for name in ("quantization_config.json",) + LEGACY_CONFIG_FILES:
        if not q and os.path.exists(os.path.join(path, name)):
            with open(os.path.join(path, name)) as f:
                q = with_legacy_quant_method(json.load(f))
    if not q:
        raise Int4FormatError("config.json has no quantization_config", file="config.json",
                              tensor="quantization_config", expected="a dict", found=None)
    return q


def check_checkpoint(path: str, device_type: Optional[str] = None,
                     act_dtype: torch.dtype = torch.bfloat16) -> Report:
    """Validate every quantized layer offline; never raises for checkpoint problems."""
    from safetensors import safe_open

    rep = Report(path=path)
    try:
        fmt = parse_format(_load_config(path))
    except Int4FormatError as e:
        from .convert import detect_source

        kind = detect_source(Path(path))
        if kind is not None:  # a layout vLLM cannot load in place but convert rewrites
            e = Int4FormatError(f"{kind} checkpoint: vLLM cannot load it in place; rewrite it "
                                f"losslessly with `vllm-int4xpu convert {path} OUT` and serve OUT",
                                file=path, expected="a checkpoint vLLM loads in place",
                                found=kind)
        rep.problems.append(e)
        return rep
    rep.fmt, rep.description = fmt, fmt.describe()
    shapes = config_shapes(_model_config(path))
    primary = _primary_tensor(fmt)
    # module prefix -> {suffix: (file, key)}
    where: dict[str, dict[str, tuple[str, str]]] = defaultdict(dict)
    linears = set()
    for fname in safetensors_files(path):
        try:
            with safe_open(os.path.join(path, fname), "pt") as f:
                keys = list(f.keys())
        except Exception as e:  # missing, unreadable or not a safetensors file
            rep.problems.append(_unreadable(fname, e))
            continue
        for key in keys:
            mod, _, suffix = key.rpartition(".")
            where[mod][suffix] = (fname, key)
            if suffix == "weight" and mod.rsplit(".", 1)[-1].endswith("proj"):
                linears.add(mod)
    handles: dict[str, Any] = {}

    def read(fname: str, key: str) -> torch.Tensor:
        try:
            if fname not in handles:
                handles[fname] = safe_open(os.path.join(path, fname), "pt")
            return handles[fname].get_tensor(key)
        except Exception as e:  # a header that lies about the data (truncated file)
            raise _unreadable(fname, e, key) from None

    # a layer with the format's other tensors but not its packed codes
    names = {sp.name for sp in fmt.tensor_specs(LayerGeometry(*_probe_geometry(fmt)))}
    for mod in sorted(m for m, sfx in where.items() if primary not in sfx
                      and (set(sfx) & names) - {"weight", "bias"}):
        some = sorted((set(where[mod]) & names) - {"weight", "bias"})[0]
        rep.problems.append(Int4FormatError(
            "quantized layer without its packed weight", file=where[mod][some][0],
            tensor=f"{mod}.{primary}", expected=f"{primary} beside {some}", found=None))

    seen_specs: dict = {}
    experts: dict = defaultdict(lambda: defaultdict(dict))  # prefix -> expert -> proj -> weight
    is_moe = _config_num_experts(_model_config(path)) is not None
    for mod in sorted(m for m, sfx in where.items() if primary in sfx):
        files = {s: fk[0] for s, fk in where[mod].items()}
        main_file = files[primary]
        try:
            if not fmt.is_layer_quantized(mod):
                raise Int4FormatError("layer has quantized tensors but the config says it is not "
                                      "quantized", tensor=mod, expected="listed as quantized",
                                      found="in the skip/ignore list")
            t = {s: read(*fk) for s, fk in where[mod].items()}
            parts = mod.rsplit(".", 2)
            leaf, parent = parts[-1], (parts[-2] if len(parts) > 1 else "")
            # config sizes only for the plain decoder projections (self_attn.*, mlp.*); MoE
            # shared experts and others have their own sizes: their tensors' shapes are used
            K, N = (shapes[leaf] if leaf in shapes and parent in ("self_attn", "mlp")
                    else infer_shape(fmt, t))
            geo = LayerGeometry(K, N, K, N)
            bias = t.get("bias")
            if bias is not None and (tuple(bias.shape) != (N,) or not bias.is_floating_point()):
                raise Int4FormatError("bias does not fit the layer", file=files.get("bias"),
                                      tensor=f"{mod}.bias", expected=f"float [{N}]",
                                      found=f"{bias.dtype} {list(bias.shape)}")
            if bias is not None and not torch.isfinite(bias).all():
                raise Int4FormatError("bias is not finite", file=files.get("bias"),
                                      tensor=f"{mod}.bias", expected="finite values",
                                      found=f"{int((~torch.isfinite(bias)).sum())} NaN/inf")
            tensors = {}
            for spec in fmt.tensor_specs(geo):
                if spec.name not in t:
                    if spec.optional:
                        continue
                    raise Int4FormatError("tensor missing from checkpoint", file=main_file,
                                          tensor=f"{mod}.{spec.name}", expected=list(spec.shape),
                                          found=None)
                try:
                    x = fmt.prepare_loaded(spec.name, t[spec.name], geo)
                except Int4FormatError as e:
                    raise e.with_context(file=files.get(spec.name), tensor=f"{mod}.{spec.name}")
                if tuple(x.shape) != tuple(spec.shape):
                    raise Int4FormatError("tensor has the wrong shape", file=files.get(spec.name),
                                          tensor=f"{mod}.{spec.name}", expected=list(spec.shape),
                                          found=list(x.shape))
                tensors[spec.name] = x
            try:
                w: Int4Weight = fmt.to_canonical(tensors, geo)
                w.validate(file=main_file, name=mod)
            except Int4FormatError as e:
                tname = e.tensor if (e.tensor or "").startswith(mod) else f"{mod}.{e.tensor}"
                raise e.with_context(file=e.file or files.get((e.tensor or "").rsplit(".", 1)[-1],
                                                               main_file), tensor=tname)
        except Int4FormatError as e:
            if not (e.tensor or "").startswith(mod):  # e.g. a group size the layer cannot take
                e = e.with_context(file=e.file or main_file,
                                   tensor=f"{mod}.{e.tensor}" if e.tensor else mod)
            rep.problems.append(e if e.file else e.with_context(file=main_file))
            continue
        rep.layers += 1
        m = _EXPERT_MODULE.match(mod)
        if m:
            experts[m.group(1)][int(m.group(2))][m.group(3)] = w
        if is_moe and mod.rsplit(".", 1)[-1] in ROUTERS:
            rep.dequantized_at_load.append(mod)
            continue
        from .kernels import Int4LinearSpec

        spec = Int4LinearSpec.of(w, act_dtype, device_type or _device_type())
        rep.specs[spec] += 1
        if spec not in seen_specs:
            seen_specs[spec] = _backend_for(spec)
    rep.unquantized_linears = sorted(m for m in linears if primary not in where[m])
    from .kernels.selector import _describe

    _check_moe(rep, experts, _model_config(path), act_dtype, device_type or _device_type(),
               lambda mod: next(iter(where.get(mod, {}).values()), (None,))[0])

    rep.backends = {_describe(s): b for s, b in seen_specs.items()}
    return rep


# MoE routers vLLM builds without a quantization method: int4 ones are dequantized at load
ROUTERS = ("gate", "router", "shared_expert_gate")
_EXPERT_MODULE = re.compile(r"^(.*\.experts)\.(\d+)\.([^.]+)$")
# an expert's (gate, up, down) projection names: Qwen/DeepSeek/transformers-5 and Mixtral
_EXPERT_PROJECTIONS = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


def _config_num_experts(cfg: dict) -> Optional[int]:
    c = cfg.get("text_config") or cfg
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if isinstance(c.get(key), int):
            return c[key]
    return None


def _check_moe(rep: Report, experts: dict, cfg: dict, act_dtype, device_type: str,
               file_of=lambda mod: None) -> None:
    """Per MoE layer: every expert of the config present with its three projections, all of one
    shape; then the MoE kernel backend that would run the stacked experts."""
    from .kernels.moe_base import Int4MoESpec
    from .kernels.selector import _describe, select_moe_kernel
    from .weight import Int4Experts, concat_out_features, widest_zero_kind

    want = _config_num_experts(cfg)
    for prefix, per in sorted(experts.items()):
        try:
            E = want if want is not None else max(per) + 1
            if max(per) >= E:
                raise Int4FormatError("checkpoint has more experts than the model config",
                                      tensor=f"{prefix}.{max(per)}", expected=f"expert index < {E}",
                                      found=max(per))
            projs = next((p for p in _EXPERT_PROJECTIONS if set(p) & set(per[min(per)])),
                         _EXPERT_PROJECTIONS[0])
            w13, w2 = [], []
            for e in range(E):
                missing = [p for p in projs if p not in per.get(e, {})]
                if missing:
                    raise Int4FormatError("expert missing from checkpoint", tensor=f"{prefix}.{e}.{missing[0]}",
                                          expected=f"{E} experts with {', '.join(projs)}",
                                          found=sorted(per.get(e, {})))
                w13.append(concat_out_features([per[e][projs[0]], per[e][projs[1]]],
                                               name=f"{prefix}.{e}"))
                w2.append(per[e][projs[2]])
            kind = widest_zero_kind(w13 + w2)
            s13, s2 = Int4Experts.stack(w13, kind), Int4Experts.stack(w2, kind)
        except Int4FormatError as e:
            # the file of the named expert module, else of any expert of this layer
            first = next(f"{prefix}.{e_}.{p}" for e_ in sorted(per) for p in per[e_])
            rep.problems.append(e if e.file else e.with_context(
                file=file_of(e.tensor or "") or file_of(first)))
            continue
        spec = Int4MoESpec.of(s13, s2, act_dtype, device_type)
        what = _describe(spec)
        rep.moe[prefix] = (E, what)
        if what not in rep.moe_backends:
            try:
                rep.moe_backends[what] = select_moe_kernel(spec).name
            except Int4FormatError as e:
                rep.moe_backends[what] = f"none ({e})"


def _device_type() -> str:
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def _backend_for(spec) -> str:
    from .kernels import select_kernel

    try:
        return select_kernel(spec).name
    except Int4FormatError as e:
        return f"none ({e})"


def format_report(rep: Report) -> str:
    lines = [f"checkpoint: {rep.path}"]
    d = rep.description
    if rep.fmt is not None:
        extra = {k: v for k, v in d.items() if k not in ("format", "bits", "group_size",
                                                         "zero_point", "act_order")}
        lines += [f"format:      {d.get('format')}" + (f" {extra}" if extra else ""),
                  f"bits:        {d.get('bits')}",
                  f"group size:  {d.get('group_size')}",
                  f"zero points: {d.get('zero_point')}",
                  f"act-order:   {d.get('act_order')}",
                  f"quantized layers: {rep.layers}"]
        if rep.unquantized_linears:
            lines.append(f"unquantized linear layers: {len(rep.unquantized_linears)} "
                         f"({', '.join(rep.unquantized_linears[:4])}"
                         f"{', ...' if len(rep.unquantized_linears) > 4 else ''})")
        kinds = Counter((s.zero_kind.value, s.group_size, s.has_g_idx) for s in rep.specs.elements())
        if kinds:
            lines.append("canonical layers: " + ", ".join(
                f"{n}x zero={z} group={g}{' act-order' if a else ''}" for (z, g, a), n in kinds.items()))
        by_backend: dict[str, list[str]] = defaultdict(list)
        for what, backend in rep.backends.items():
            by_backend[backend].append(what)
        for backend, whats in by_backend.items():
            lines.append(f"kernel backend on this machine: {backend} ({len(whats)} layer shape"
                         f"{'s' if len(whats) > 1 else ''}: {'; '.join(whats)})")
        if rep.dequantized_at_load:
            lines.append(f"dequantized once at load (MoE routers vLLM builds without a "
                         f"quantization method): {len(rep.dequantized_at_load)} "
                         f"({', '.join(rep.dequantized_at_load[:4])}"
                         f"{', ...' if len(rep.dequantized_at_load) > 4 else ''})")
        if rep.moe:
            lines.append(f"MoE layers: {len(rep.moe)} with int4 experts "
                         f"({', '.join(sorted({str(e) for e, _ in rep.moe.values()}))} experts each)")
            for what, backend in rep.moe_backends.items():
                lines.append(f"MoE kernel backend on this machine: {backend} ({what})")
    lines.append(f"problems: {len(rep.problems)}")
    for e in rep.problems[:50]:
        lines.append(f"  - {e}")
    if len(rep.problems) > 50:
        lines.append(f"  ... and {len(rep.problems) - 50} more")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="vllm-int4xpu inspect",
                                 description="Describe and validate an int4 checkpoint offline.")
    ap.add_argument("ckpt_dir", help="checkpoint directory (config.json + *.safetensors) or a "
                                     "Hugging Face model id org/name")
    ap.add_argument("--revision", default=None, help="branch, tag or commit of a model id")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda", "xpu"], default="auto",
                    help="device type to choose the kernel backend for (default: this machine)")
    ap.add_argument("--json", action="store_true", help="print a JSON summary instead")
    args = ap.parse_args(argv)
    logging.getLogger("vllm_int4xpu").setLevel(logging.WARNING)
    if not os.path.isdir(args.ckpt_dir) and not looks_like_model_id(args.ckpt_dir):
        print(f"error: not a directory: {args.ckpt_dir}", file=sys.stderr)
        return 2
    try:
        path = str(resolve_model(args.ckpt_dir, args.revision))
    except Int4FormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rep = check_checkpoint(path, None if args.device == "auto" else args.device)
    if args.json:
        print(json.dumps({"path": rep.path, **rep.description, "quantized_layers": rep.layers,
                          "unquantized_linears": rep.unquantized_linears,
                          "backends": rep.backends, "moe_layers": {p: e for p, (e, _) in rep.moe.items()},
                          "moe_backends": rep.moe_backends,
                          "problems": [str(e) for e in rep.problems]},
                         indent=1, default=str))
    else:
        print(format_report(rep))
    return 0 if not rep.problems else 1


if __name__ == "__main__":
    sys.exit(main())
