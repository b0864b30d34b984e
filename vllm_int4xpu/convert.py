"""``vllm-int4xpu convert SRC OUT``: rewrite an int4 checkpoint that vLLM cannot load in place
into the native int4xpu format, losslessly.

Sources handled:

* **HQQ's own save** (``hqq.models.hf.base.AutoHQQHFModel.save_quantized``): ``config.json``
  without ``quantization_config`` plus ``qmodel.pt``, a ``torch.save`` of ``{module name:
  state dict}``. Quantized linears hold ``W_q`` (hqq's 4-bit row-split packing, see
  ``formats/hqq.py``), ``scale`` and ``zero`` ([N*K/g, 1], w = (q - zero) * scale), ``shape``,
  ``nbits``, ``group_size``, ``axis``, ``view_as_float`` and an optional ``bias``; every other
  module holds its plain parameters. The file is read with ``torch.load(weights_only=True)``,
  which never unpickles arbitrary objects.
* **HQQ safetensors with ``view_as_float``** (transformers' ``HqqConfig`` save, whose ``W_q``
  bytes are stored reinterpreted as a float tensor): the bytes are viewed back as uint8.

Each quantized layer goes through the HQQ format adapter (:class:`formats.hqq.HQQFormat`), so
OUT's weights are bit for bit the canonical weights the HQQ loader serves: codes and scales
unchanged, the float zero point as z = (8 - zero) * scale in float32. :func:`convert_checkpoint`
checks every layer against hqq's formula (q - zero) * scale evaluated in float64 and reports
how many layers are exact (float32 holds z exactly unless zero and scale together carry more
than 24 significant bits; the difference is then below one float32 ulp of z).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterator, Optional

import torch

from .errors import Int4FormatError
from .formats.base import LayerGeometry
from .formats.hqq import HQQFormat, unpack_hqq_rows
from .formats.native import NativeFormat
from .hub import resolve_model
from .weight import Int4Weight, ZeroKind, dequantize

logger = logging.getLogger("vllm_int4xpu.convert")
HQQ_WEIGHT_FILE = "qmodel.pt"


def detect_source(src: Path) -> Optional[str]:
    """The kind of convertible checkpoint in ``src`` ("hqq-save", "hqq-view-as-float"), or None."""
    cfg_path = src / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return None
    qc = cfg.get("quantization_config") or {}
    if (src / HQQ_WEIGHT_FILE).exists() and not qc:
        return "hqq-save"
    if str(qc.get("quant_method", "")).lower() == "hqq" and _view_as_float(qc):
        return "hqq-view-as-float"
    return None


def _view_as_float(qc: dict) -> bool:
    inner = qc.get("quant_config") or {}
    params = [inner.get("weight_quant_params")] + [
        v.get("weight_quant_params") for v in inner.values() if isinstance(v, dict)]
    return any(isinstance(p, dict) and p.get("view_as_float") for p in params)


# ------------------------------------------------------------------------------ HQQ layers
def _scalar(v, key: str, prefix: str, file: str):
    if torch.is_tensor(v):
        if v.numel() != 1:
            raise Int4FormatError("hqq: metadata must be a scalar", file=file,
                                  tensor=f"{prefix}.{key}", expected="one value",
                                  found=list(v.shape))
        return v.item()
    return v


def hqq_layer_weight(sd: dict, prefix: str, file: str) -> tuple[Int4Weight, torch.Tensor]:
    """One HQQ quantized linear (its state dict) -> (canonical weight, float64 dequantization
    by hqq's formula)."""
    def get(key):
        if key not in sd or sd[key] is None:
            raise Int4FormatError("hqq: quantized layer lacks a tensor", file=file,
                                  tensor=f"{prefix}.{key}", expected="present", found="missing")
        return sd[key]

    nbits = _scalar(get("nbits"), "nbits", prefix, file)
    if nbits != 4:
        raise Int4FormatError("hqq: only 4-bit layers can be converted", file=file,
                              tensor=f"{prefix}.nbits", expected=4, found=nbits)
    axis = _scalar(sd.get("axis", 1), "axis", prefix, file)
    if axis != 1:
        raise Int4FormatError("hqq: only axis 1 (groups along the input dim) can be converted",
                              file=file, tensor=f"{prefix}.axis", expected=1, found=axis)
    for key in ("quant_scale", "quant_zero"):
        if _scalar(sd.get(key, False), key, prefix, file):
            raise Int4FormatError("hqq: quantized scales/zero points cannot be converted",
                                  file=file, tensor=f"{prefix}.{key}", expected=False, found=True)
    shape = get("shape")
    shape = [int(x) for x in (shape.tolist() if torch.is_tensor(shape) else shape)]
    if len(shape) != 2:
        raise Int4FormatError("hqq: shape must be [out, in]", file=file, tensor=f"{prefix}.shape",
                              expected="[N, K]", found=shape)
    N, K = shape
    g = _scalar(sd.get("group_size"), "group_size", prefix, file)
    g = K if g in (None, 0) else int(g)
    w_q = get("W_q")
    if w_q.dtype != torch.uint8:  # view_as_float: the packed bytes stored as a float tensor
        w_q = w_q.contiguous().view(torch.uint8)
    fmt = HQQFormat(bits=4, group_size=-1 if g == K else g, zero_kind=ZeroKind.FLOAT)
    geo = LayerGeometry(K, N, K, N)
    tensors = {}
    try:
        for key, t in (("W_q", w_q), ("scale", get("scale")), ("zero", get("zero"))):
            tensors[key] = fmt.prepare_loaded(key, t, geo)
        w = fmt.to_canonical(tensors, geo).validate(file=file, name=prefix)
    except Int4FormatError as e:
        where = e.tensor if e.tensor and e.tensor.startswith(prefix) else \
            f"{prefix}.{e.tensor}" if e.tensor else prefix
        raise e.with_context(file=file, tensor=where) from None
    codes = unpack_hqq_rows(w_q).to(torch.float64).reshape(N, K)
    rows = lambda t: t.to(torch.float64).reshape(N, K // g).repeat_interleave(g, dim=1)  # noqa: E731
    exact = (codes - rows(get("zero"))) * rows(get("scale"))
    return w, exact


def _hqq_save_modules(src: Path) -> Iterator[tuple[str, dict]]:
    path = src / HQQ_WEIGHT_FILE
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # UnpicklingError for anything but tensors and plain containers
        raise Int4FormatError("cannot read hqq's qmodel.pt with weights_only=True", file=str(path),
                              expected="a torch.save of {module: state dict}",
                              found=f"{type(e).__name__}: {str(e).splitlines()[0]}") from None
    if not isinstance(weights, dict):
        raise Int4FormatError("qmodel.pt is not a dict of module state dicts", file=str(path),
                              expected="dict", found=type(weights).__name__)
    for name, sd in weights.items():
        if not isinstance(sd, dict):
            raise Int4FormatError("qmodel.pt entry is not a state dict", file=str(path),
                                  tensor=str(name), expected="dict", found=type(sd).__name__)
        yield str(name), sd


def _hqq_safetensors_modules(src: Path) -> Iterator[tuple[str, dict]]:
    from safetensors import safe_open

    from .quantizer import _safetensors_files

    groups: dict[str, dict] = {}
    for f in _safetensors_files(src):
        with safe_open(f, "pt") as sf:
            for key in sf.keys():
                mod, _, leaf = key.rpartition(".")
                groups.setdefault(mod, {})[leaf] = sf.get_tensor(key)
    for mod, sd in groups.items():
        yield mod, sd


# ------------------------------------------------------------------------------ driver
def convert_checkpoint(src_dir: str | os.PathLike, out_dir: str | os.PathLike,
                       revision: Optional[str] = None, progress: bool = True) -> dict:
    """Convert ``src_dir`` (a directory or model id) into a native checkpoint at ``out_dir``.
    Returns a summary: source kind, layers, group size, exact layers, largest difference."""
    from tqdm.auto import tqdm

    from .quantizer import NativeCheckpointWriter

    out = Path(out_dir).resolve()
    if out.exists():
        raise Int4FormatError("output directory already exists; refusing to overwrite",
                              file=str(out), expected="a new path", found="existing path")
    src = resolve_model(src_dir, revision)
    kind = detect_source(src)
    if kind is None:
        raise Int4FormatError("nothing to convert: not a layout convert handles", file=str(src),
                              expected="HQQ's own save (config.json + qmodel.pt) or HQQ "
                                       "safetensors with view_as_float",
                              found=_describe(src))
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)
    file = str(src / (HQQ_WEIGHT_FILE if kind == "hqq-save" else "model.safetensors"))
    modules = _hqq_save_modules(src) if kind == "hqq-save" else _hqq_safetensors_modules(src)
    meta = set(HQQFormat.dropped_suffixes)
    quantized, group_sizes, inexact, max_diff = [], set(), 0, 0.0
    with NativeCheckpointWriter(out) as writer:
        for name, sd in tqdm(list(modules), desc="converting", unit="module", disable=not progress):
            if "W_q" in sd:
                w, exact = hqq_layer_weight(sd, name, file)
                got = dequantize(w, torch.float64)
                diff = float((got - exact).abs().max()) if got.numel() else 0.0
                if diff:
                    inexact += 1
                    max_diff = max(max_diff, diff / max(float(exact.abs().max()), 1e-30))
                g_cfg = -1 if _scalar(sd.get("group_size"), "group_size", name, file) in (None, 0) \
                    else w.group_size
                group_sizes.add(g_cfg)
                if len(group_sizes) > 1:
                    raise Int4FormatError("layers use different group sizes; the native format "
                                          "has one", file=file, tensor=name,
                                          expected=sorted(group_sizes - {g_cfg}), found=g_cfg)
                writer.add_weight(name, w)
                if sd.get("bias") is not None:
                    writer.add(f"{name}.bias", sd["bias"])
                quantized.append(name)
            else:
                for key, t in sd.items():
                    if torch.is_tensor(t) and f".{key}" not in meta:
                        writer.add(f"{name}.{key}" if name else key, t)
        if not quantized:
            raise Int4FormatError("no quantized layer (W_q) found", file=file,
                                  expected="at least one HQQ layer", found="none")
        g = group_sizes.pop()
        skip = _unquantized_linears(src, set(quantized)) or ["lm_head"]
        fmt = NativeFormat(group_size=g, zero_kind=ZeroKind.FLOAT, skip_modules=skip)
        writer.finish(config, fmt, copy_from=src)
    summary = {"source": kind, "layers": len(quantized), "group_size": g,
               "exact_layers": len(quantized) - inexact, "max_relative_difference": max_diff}
    logger.info("converted %s (%s): %d int4 layers, group %d; %d of them bit-exact against "
                "(q - zero) * scale in float64%s", src, kind, len(quantized), g,
                len(quantized) - inexact,
                "" if not inexact else f", the others within {max_diff:.1e} (relative)")
    return summary


def _unquantized_linears(src: Path, quantized: set[str]) -> list[str]:
    """nn.Linear modules of the model that the source left unquantized (lm_head, ...): named
    in modules_to_not_convert so vLLM builds them dense."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(src)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # an architecture transformers does not know: fall back to lm_head
        logger.warning("cannot build the model skeleton to list unquantized linears (%s); "
                       "assuming only lm_head is unquantized", e)
        return []
    return sorted(n for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and n not in quantized)


def _describe(src: Path) -> str:
    try:
        cfg = json.loads((src / "config.json").read_text())
    except (OSError, ValueError):
        return "no readable config.json"
    qc = cfg.get("quantization_config")
    if qc:
        return f"quant_method {qc.get('quant_method')!r} (vLLM loads it in place: serve it as is)"
    return "an unquantized model (use `vllm-int4xpu quantize`)"


def main(argv: Optional[list[str]] = None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(
        prog="vllm-int4xpu convert",
        description="Rewrite an int4 checkpoint that vLLM cannot load in place into the native "
                    "int4xpu format, losslessly: HQQ's own save (config.json + qmodel.pt, read "
                    "with torch.load(weights_only=True)) and HQQ safetensors with view_as_float. "
                    "Writes to a temporary directory and renames at the end; refuses to "
                    "overwrite.")
    ap.add_argument("src", help="checkpoint directory or Hugging Face model id (org/name)")
    ap.add_argument("out", help="new output directory (must not exist)")
    ap.add_argument("--revision", default=None, help="branch, tag or commit of a model id")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        s = convert_checkpoint(args.src, args.out, revision=args.revision,
                               progress=not args.quiet)
    except Int4FormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote int4xpu checkpoint ({s['layers']} int4 layers, group {s['group_size']}, float "
          f"zero points; {s['exact_layers']} of {s['layers']} bit-exact in float64) to "
          f"{Path(args.out).resolve()}")
    print(f"serve it with: vllm serve {Path(args.out).resolve()}")
    return 0
