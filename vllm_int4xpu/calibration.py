"""Calibration-based quantization of a Hugging Face model, one decoder layer at a time (GPTQ).

The model is loaded once in its own dtype (bf16 for most); each decoder layer in turn is cast to
float32, run on the calibration activations with hooks that accumulate every linear's Hessian
``H = Σ x xᵀ``, quantized with :func:`quant_methods.quantize_gptq`, and run again with its
quantized weights to produce the next layer's inputs; then its weights are dropped. Linears that
read the same input (q/k/v, gate/up) are quantized together, each such set after the ones that
run before it in the layer ("true sequential"), so every Hessian sees the quantized outputs of
what comes earlier. Beside these quantized-model activations a second stream runs the float
model on the same windows, and each linear is quantized towards the output the float model gives
on its own inputs (:func:`quant_methods.asymmetric_target`), so every layer also absorbs the error
that the layers before it left in its inputs. Peak memory: the model in its dtype + one layer in
float32 (twice: quantized and float copies) + both activation streams (2 × samples × seqlen ×
hidden, float32).

Calibration text: ``--calib FILE`` or the package's own sample (``data/calibration.txt``, written
for this project: prose, dialogue, code, math, tables; nothing is downloaded). Documents are
separated by a line ``=====``; they are tokenized, joined with the EOS token and cut into
``seqlen``-token windows.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Optional

import torch

from .errors import Int4FormatError
from .quant_methods import (asymmetric_correction, asymmetric_target, prepare_hessian,
                            quantize_gptq)
from .weight import Int4Weight, ZeroKind, dequantize

logger = logging.getLogger("vllm_int4xpu.quantize")
BUILTIN_CALIBRATION = Path(__file__).resolve().parent / "data" / "calibration.txt"
DOC_SEPARATOR = "====="
MIN_WINDOWS = 4


def calibration_documents(path: Optional[str | Path] = None) -> list[str]:
    """The documents of a calibration text file (the built-in sample when ``path`` is None)."""
    p = Path(path) if path is not None else BUILTIN_CALIBRATION
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise Int4FormatError("cannot read the calibration text", file=str(p),
                              expected="a readable UTF-8 text file", found=str(e)) from None
    docs = [d.strip() for d in text.split(f"\n{DOC_SEPARATOR}\n")]
    docs = [d for d in docs if d]
    if not docs:
        raise Int4FormatError("calibration text is empty", file=str(p),
                              expected="UTF-8 text (documents separated by '=====' lines)",
                              found="no text")
    return docs


def calibration_windows(tokenizer, docs: list[str], seqlen: int, nsamples: int,
                        source: str = "calibration text") -> torch.Tensor:
    """Token windows [n, seqlen] (n ≤ nsamples, evenly spread) cut from the documents joined
    by EOS."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for d in docs:
        ids += tokenizer(d, add_special_tokens=False)["input_ids"]
        if eos is not None:
            ids.append(eos)
    total = len(ids) // seqlen
    if min(total, nsamples) < MIN_WINDOWS:
        raise Int4FormatError("calibration text too short", file=source,
                              expected=f">= {MIN_WINDOWS * seqlen} tokens "
                                       f"({MIN_WINDOWS} windows of {seqlen})",
                              found=f"{len(ids)} tokens")
    windows = torch.tensor(ids[: total * seqlen], dtype=torch.long).view(total, seqlen)
    # more windows than asked: take them evenly spread over the text, not just its beginning
    pick = torch.linspace(0, total - 1, min(total, nsamples)).round().long()
    return windows[pick]


class _StopForward(Exception):
    pass


class _Catcher(torch.nn.Module):
    """Stands in for decoder layer 0 to record its inputs, then stops the forward."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer
        self.inputs: list[torch.Tensor] = []
        self.kwargs: dict = {}

    def __getattr__(self, name):  # models read attributes of their layers (attention_type, ...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)

    def forward(self, hidden_states, *args, **kwargs):
        self.inputs.append(hidden_states)
        self.kwargs = kwargs
        raise _StopForward


def _decoder_layers(model, num_layers: int) -> tuple[torch.nn.Module, str, torch.nn.ModuleList]:
    """The module holding the decoder layers, its name and the ModuleList itself."""
    for name, mod in model.named_modules():
        for child_name, child in mod.named_children():
            if isinstance(child, torch.nn.ModuleList) and len(child) == num_layers:
                full = f"{name}.{child_name}" if name else child_name
                return mod, full, child
    raise Int4FormatError("cannot find the decoder layers of the model", tensor="layers",
                          expected=f"a ModuleList of {num_layers} layers", found="none")


def _to_float(obj):
    if torch.is_tensor(obj) and obj.is_floating_point():
        return obj.to(torch.float32)
    if isinstance(obj, tuple):
        return tuple(_to_float(o) for o in obj)
    if isinstance(obj, list):
        return [_to_float(o) for o in obj]
    return obj


def _layer_out(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def gptq_quantize_model(src: Path, targets: set[str], group_size: int, zero_kind: ZeroKind,
                        scale_dtype: torch.dtype, act_order: bool = False,
                        calib: Optional[str | Path] = None, nsamples: int = 32,
                        seqlen: int = 512, batch_size: int = 8, progress: bool = True,
                        damp: float = 0.01, asymmetric: bool = True) -> dict[str, Int4Weight]:
    """GPTQ every ``targets`` weight (checkpoint names ``<module>.weight``) of the decoder layers
    of the model in ``src``; returns name -> Int4Weight. Targets that no calibration input
    reaches (outside the decoder layers, or not ``nn.Linear`` in memory, e.g. transformers'
    fused MoE experts) are left to the caller.

    ``asymmetric``: each linear is quantized towards the output its float model gives on the
    float model's own inputs (not on the quantized model's inputs): a second, unquantized stream
    of activations runs beside the quantized one, and GPTQ gets the target weight
    W* = W + W (C − H) H⁻¹ with C = Σ x_floatᵀ x_quant (:func:`quant_methods.asymmetric_target`),
    so the error that earlier layers left in this layer's inputs is compensated too."""
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    docs = calibration_documents(calib)
    tokenizer = AutoTokenizer.from_pretrained(src)
    windows = calibration_windows(tokenizer, docs, seqlen, nsamples,
                                  source=str(calib or BUILTIN_CALIBRATION))
    config = AutoConfig.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    model.eval()
    num_layers = config.get_text_config().num_hidden_layers
    parent, layers_name, layers = _decoder_layers(model, num_layers)
    # embeddings, rotary tables and the final norm in float32 so layer inputs are exact
    for name, child in parent.named_children():
        if child is not layers:
            child.float()

    catcher = _Catcher(layers[0])
    layers[0] = catcher
    with torch.no_grad():
        for b in range(0, windows.shape[0], batch_size):
            try:
                model(input_ids=windows[b:b + batch_size], use_cache=False)
            except _StopForward:
                pass
    layers[0] = catcher.layer
    hidden = [_to_float(h) for h in catcher.inputs]
    kwargs = _to_float(catcher.kwargs)
    kwargs.pop("past_key_values", None)
    kwargs.pop("past_key_value", None)
    kwargs["use_cache"] = False
    logger.info("GPTQ calibration: %d windows of %d tokens (%s)", windows.shape[0], seqlen,
                calib or "built-in sample")

    results: dict[str, Int4Weight] = {}
    hidden_fp = list(hidden) if asymmetric else None  # the float model's own activations
    bar = tqdm(total=num_layers, desc="GPTQ", unit="layer", disable=not progress)
    for i in range(num_layers):
        layer = layers[i].float()
        fp_layer = copy.deepcopy(layer) if asymmetric else None
        prefix = f"{layers_name}.{i}."
        remaining = {f"{prefix}{n}.weight": m for n, m in layer.named_modules()
                     if isinstance(m, torch.nn.Linear) and f"{prefix}{n}.weight" in targets}
        fp_inputs = None
        if asymmetric:  # one float forward per batch: the inputs of every target, the outputs
            fp_inputs, hidden_fp = _float_inputs(fp_layer, prefix, remaining, hidden_fp, kwargs)
        while remaining:
            group, hess, cross = _next_group_hessian(layer, remaining, hidden, kwargs, fp_inputs)
            if not group:  # nothing left is reached by the calibration inputs
                break
            prepared = prepare_hessian(hess, act_order, damp)  # one factorisation for q/k/v
            correction = None if cross is None else asymmetric_correction(hess, cross, damp)
            for name in group:
                mod = remaining.pop(name)
                target = mod.weight.data
                if correction is not None:
                    target = asymmetric_target(target, hess, cross, correction=correction)
                w = quantize_gptq(target, prepared, group_size, zero_kind,
                                  scale_dtype=scale_dtype)
                mod.weight.data = dequantize(w, torch.float32)
                results[name] = w
        with torch.no_grad():
            hidden = [_layer_out(layer(h, **kwargs)) for h in hidden]
        layers[i] = layer.to("meta")  # done with this layer's weights
        del fp_layer, fp_inputs
        bar.update(1)
    bar.close()
    return results


def _float_inputs(fp_layer, prefix: str, targets: dict, hidden_fp, kwargs):
    """Run the float layer once on every batch of its own inputs: (name -> per-batch input of
    each target linear, as the float model computes it; the layer's outputs, the next layer's
    float inputs). Linears that share an input share the stored tensor."""
    captured: dict[str, list] = {name: [] for name in targets}
    handles = []
    for n, m in fp_layer.named_modules():
        name = f"{prefix}{n}.weight"
        if name in captured:
            handles.append(m.register_forward_pre_hook(
                lambda mod, args, name=name: captured[name].append(args[0])))
    try:
        with torch.no_grad():
            outputs = [_layer_out(fp_layer(h, **kwargs)) for h in hidden_fp]
    finally:
        for handle in handles:
            handle.remove()
    return captured, outputs


def _next_group_hessian(layer, linears: dict[str, torch.nn.Module], hidden, kwargs,
                        fp_inputs: Optional[dict] = None
                        ) -> tuple[list[str], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The first-called of ``linears`` and those reading the same input tensor (q/k/v,
    gate/up), with the Hessian H = Σ xᵀx of that input (float64) over every batch. The forward of
    each batch stops as soon as that group has been called, and the shared input's xᵀx is
    computed once. With ``fp_inputs`` (:func:`_float_inputs`), also C = Σ x_fpᵀ x (else None);
    the group's float inputs are dropped from it once used."""
    group: list[str] = []
    acc: dict = {"h": None, "c": None}
    first_batch = True
    seen: set[str] = set()
    shared: dict = {"x": None}

    def hook(name):
        def fn(mod, args):
            x = args[0]
            if first_batch and not group:
                group.append(name)
            elif first_batch and x is shared["x"] and name not in group:
                group.append(name)
            if name not in group or name in seen:
                raise _StopForward  # past the group: the rest of the layer is not needed
            if x is not shared["x"]:  # the group's input in this batch: once per batch
                x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
                shared["x"] = x
                h = (x2.t() @ x2).to(torch.float64)
                acc["h"] = h if acc["h"] is None else acc["h"] + h
            seen.add(name)
            if not first_batch and len(seen) == len(group):
                raise _StopForward
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        with torch.no_grad():
            for b, h in enumerate(hidden):
                seen.clear()
                shared["x"] = None
                try:
                    layer(h, **kwargs)
                except _StopForward:
                    pass
                first_batch = False
                if fp_inputs is not None and group:
                    # the same group's input in the float model, for the same tokens
                    x = shared["x"].reshape(-1, shared["x"].shape[-1]).to(torch.float32)
                    xf = fp_inputs[group[0]][b].reshape(-1, x.shape[-1]).to(torch.float32)
                    c = (xf.t() @ x).to(torch.float64)
                    acc["c"] = c if acc["c"] is None else acc["c"] + c
    finally:
        for handle in handles:
            handle.remove()
    if fp_inputs is not None:
        for name in group:
            fp_inputs.pop(name, None)
    return group, acc["h"], acc["c"]
