"""Quantize a bf16/fp16/fp32 Hugging Face model (directory or model id) into a native ``int4xpu``
checkpoint.

Methods (per-group scales; see ``quant_methods.py``): ``rtn`` round-to-nearest; ``hqq``
half-quadratic optimisation of float zero points, no data; ``gptq`` error compensation from
calibration activations, layer by layer (``calibration.py``), integer or float zero points,
optional act-order. Which tensors are quantized is decided from the model's own
module tree (instantiated on the meta device from config.json, so nothing is loaded twice):
the weights of ``nn.Linear`` modules and of mixture-of-experts experts (per expert on disk,
``...experts.{e}.{gate,up,down}_proj.weight`` or Mixtral's ``w1/w3/w2``, which transformers 5
keeps fused in memory), except ``lm_head``, anything named in ``skip`` and the MoE parts that
vLLM builds without a quantization method (routers ``gate``/``router`` and
``shared_expert_gate``). ``skip=[..., "experts"]`` keeps the experts in bf16. Every skipped name
is written to ``modules_to_not_convert``, so loading treats exactly those modules as
unquantized. Embeddings and norms stay as they are. Tensors are
streamed file by file; the output is written to a temporary directory beside OUT_DIR and renamed
at the end, so a crash leaves no half checkpoint. No vLLM needed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import Int4FormatError
from .formats.base import _module_matches
from .formats.native import NativeFormat
from .hub import resolve_model
from .inspect import safetensors_files
from .quant_methods import quantize_hqq
from .weight import Int4Weight, ZeroKind, quantize_rtn

logger = logging.getLogger("vllm_int4xpu.quantize")
SHARD_BYTES = 2 * 1024**3
DEFAULT_SKIP = ("lm_head",)
# Module names of MoE routers, which vLLM's MoE models expect unquantized (most build them with
# quant_config=None; Qwen3-MoE's with the method, so the checkpoint must list them as skipped);
# matched like skip entries (see formats.base._module_matches).
MOE_UNQUANTIZED = ("gate", "router", "shared_expert_gate")
# A per-expert projection weight as checkpoints store it (experts.{e}.<proj>.weight).
_EXPERT_WEIGHT = re.compile(r"(^|\.)experts\.\d+\.[^.]+\.weight$")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
METHODS = ("rtn", "hqq", "gptq")


def linear_weight_names(src: Path, weights_2d: set[str]) -> set[str]:
    """Names of the ``<module>.weight`` tensors to quantize: those of ``nn.Linear`` modules of
    the model, plus every 2-D per-expert projection weight on disk (transformers 5 holds the
    experts as fused 3-D parameters in memory, not as ``nn.Linear`` modules). ``weights_2d``:
    :func:`weights_2d_on_disk` of ``src``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(src)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = {f"{name}.weight" for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    return names | {n for n in weights_2d if _EXPERT_WEIGHT.search(n)}


def weights_2d_on_disk(src: Path) -> set[str]:
    """Names of the 2-D ``.weight`` tensors in ``src``'s safetensors files (headers only)."""
    names = set()
    for f in _safetensors_files(src):
        with safe_open(f, "pt") as sf:
            names |= {n for n in sf.keys()
                      if n.endswith(".weight") and len(sf.get_slice(n).get_shape()) == 2}
    return names


def _safetensors_files(src: Path) -> list[Path]:
    """:func:`inspect.safetensors_files` as paths, ``model.safetensors`` alone where it exists
    without an index; none is an error."""
    single = src / "model.safetensors"
    if single.exists() and not (src / "model.safetensors.index.json").exists():
        return [single]
    found = [src / f for f in safetensors_files(str(src))]
    if not found:
        raise Int4FormatError("no safetensors weights in the source model", file=str(src),
                              expected="model.safetensors or an index", found=os.listdir(src))
    return found


def _is_skipped(tensor_name: str, skip: Iterable[str]) -> bool:
    """The loader's own rule (a name, a dotted suffix or path component, a glob, 're:' regex)."""
    module = tensor_name.rsplit(".", 1)[0]
    return any(_module_matches(module, s) for s in skip)


def moe_skips(weight_names: Iterable[str]) -> list[str]:
    """The MOE_UNQUANTIZED entries that match a 2-D weight of this model (none for dense): its
    nn.Linear layers and the 2-D weights on disk (transformers 5 builds some routers, Qwen3-MoE's,
    as modules of their own, not nn.Linear; vLLM may still build them with the method)."""
    return [s for s in MOE_UNQUANTIZED if any(_is_skipped(n, [s]) for n in weight_names)]


def quantize_model(src_dir: str | os.PathLike, out_dir: str | os.PathLike, group_size: int = 64,
                   zero_point: str = "int", skip: Iterable[str] = DEFAULT_SKIP,
                   scale_dtype: Optional[torch.dtype] = None, progress: bool = True,
                   method: str = "rtn", act_order: bool = False,
                   calib: Optional[str | os.PathLike] = None, nsamples: int = 32,
                   seqlen: int = 512, revision: Optional[str] = None, damp: float = 0.01,
                   classic_gptq: bool = False) -> Path:
    """Write the native int4xpu checkpoint of ``src_dir`` (a directory or a Hugging Face model
    id, at ``revision``) to ``out_dir``; returns ``out_dir``.

    ``zero_point``: "int" (asymmetric integer zero points), "float" (float zero points) or
    "none" (symmetric). ``group_size`` -1 is per-channel. ``method``: "rtn", "hqq" (float zero
    points only) or "gptq" (with ``calib`` text, ``nsamples`` windows of ``seqlen`` tokens,
    ``act_order``; ``classic_gptq`` turns its asymmetric calibration off).
    """
    from tqdm.auto import tqdm

    zero_kind = _check_method(method, zero_point, act_order or classic_gptq, calib)
    out = Path(out_dir).resolve()
    if out.exists():  # before resolving a model id: nothing is fetched for a refused run
        raise Int4FormatError("output directory already exists; refusing to overwrite", file=str(out),
                              expected="a new path", found="existing path")
    src = resolve_model(src_dir, revision)
    if not (src / "config.json").exists():
        raise Int4FormatError("source is not a Hugging Face model directory", file=str(src / "config.json"),
                              expected="config.json", found="missing")
    if out == src or src in out.parents:
        raise Int4FormatError("output must not be the input directory or inside it", file=str(out),
                              expected=f"a path outside {src}", found=str(out))
    config = json.loads((src / "config.json").read_text())
    if config.get("quantization_config"):
        raise Int4FormatError("source model is already quantized", file=str(src / "config.json"),
                              tensor="quantization_config", expected="a bf16/fp16/fp32 model",
                              found=config["quantization_config"].get("quant_method"))
    if scale_dtype is None:
        name = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
        scale_dtype = torch.float16 if name == "float16" else torch.bfloat16
    skip = list(skip)
    weights_2d = weights_2d_on_disk(src)
    linears = linear_weight_names(src, weights_2d)
    moe = [s for s in moe_skips(linears | weights_2d) if s not in skip]
    if moe:
        logger.info("MoE routers stay unquantized (vLLM expects them unquantized): skipping "
                    "modules named %s", ", ".join(moe))
        skip += moe
    files = _safetensors_files(src)
    targets = {n for f in files for n in _names(f) if n in linears and not _is_skipped(n, skip)}
    weight_fn = _weight_quantizer(method, group_size, zero_kind, scale_dtype)
    precomputed: dict[str, Int4Weight] = {}
    if method == "gptq":
        from .calibration import gptq_quantize_model

        precomputed = gptq_quantize_model(src, targets, group_size, zero_kind, scale_dtype,
                                          act_order=act_order, calib=calib, nsamples=nsamples,
                                          seqlen=seqlen, damp=damp, progress=progress,
                                          asymmetric=not classic_gptq)
        rest = sorted(targets - set(precomputed))
        if rest:
            logger.info("GPTQ: %d weights are not nn.Linear inputs of the decoder layers in "
                        "memory (e.g. fused MoE experts) and get %s instead: %s%s", len(rest),
                        "hqq" if zero_kind == ZeroKind.FLOAT else "rtn", ", ".join(rest[:3]),
                        " ..." if len(rest) > 3 else "")

    bar = tqdm(total=len(targets), desc=f"quantizing ({method})", unit="layer",
               disable=not progress)
    with NativeCheckpointWriter(out) as writer:
        for f in files:
            with safe_open(f, "pt") as sf:
                for name in sf.keys():
                    t = sf.get_tensor(name)
                    if name in targets:
                        try:
                            w = precomputed.pop(name, None) or weight_fn(t)
                        except Int4FormatError as e:
                            raise e.with_context(file=str(f), tensor=name) from None
                        if act_order and w.g_idx is None:  # an act-order checkpoint: all have one
                            w = replace(w, g_idx=(torch.arange(w.in_features) // w.group_size)
                                        .to(torch.int32))
                        writer.add_weight(name[: -len(".weight")], w)
                        bar.update(1)
                    else:
                        writer.add(name, t)
        bar.close()
        fmt = NativeFormat(group_size=group_size, zero_kind=zero_kind,
                           act_order=act_order and method == "gptq", skip_modules=sorted(set(skip)))
        writer.finish(config, fmt, copy_from=src)
    return out


def _check_method(method: str, zero_point: str, act_order: bool, calib) -> ZeroKind:
    if method not in METHODS:
        raise Int4FormatError("unknown quantization method", tensor="method",
                              expected=list(METHODS), found=method)
    try:
        zero_kind = ZeroKind(zero_point)
    except ValueError:
        raise Int4FormatError("unknown zero-point kind", tensor="zero_point",
                              expected=[z.value for z in ZeroKind], found=zero_point) from None
    if method == "hqq" and zero_kind != ZeroKind.FLOAT:
        raise Int4FormatError("method hqq optimises float zero points", tensor="zero_point",
                              expected="float", found=zero_kind.value)
    if method != "gptq" and (act_order or calib is not None):
        raise Int4FormatError("--act-order, --calib and --classic-gptq apply to method gptq only",
                              tensor="method", expected="gptq", found=method)
    return zero_kind


def _weight_quantizer(method: str, group_size: int, zero_kind: ZeroKind, scale_dtype):
    """The data-free quantizer of one [N, K] weight for ``method`` (GPTQ's weights that no
    calibration input reaches fall back to it: rtn, or hqq for float zero points)."""
    if method == "hqq" or (method == "gptq" and zero_kind == ZeroKind.FLOAT):
        return lambda t: quantize_hqq(t, group_size, scale_dtype=scale_dtype)
    return lambda t: quantize_rtn(t, group_size, zero_kind, scale_dtype=scale_dtype)


def _names(f: Path) -> list[str]:
    with safe_open(f, "pt") as sf:
        return list(sf.keys())


class NativeCheckpointWriter:
    """Writes a native checkpoint into a temporary directory beside ``out`` (2 GiB shards) and
    renames it into place in :meth:`finish`; on any error inside the ``with`` block the
    temporary directory is removed, so a failed or killed run leaves no partial ``out``."""

    def __init__(self, out: Path):
        self.out = out
        self.weight_map: dict[str, str] = {}
        self.shard: dict[str, torch.Tensor] = {}
        self.shard_bytes = 0
        self.shard_files: list[str] = []

    def __enter__(self) -> "NativeCheckpointWriter":
        self.out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temp_dirs(self.out)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        (self.tmp / _PID_FILE).write_text(str(os.getpid()))
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            return False
        shutil.rmtree(self.tmp, ignore_errors=True)
        if isinstance(exc, OSError):  # disk full, read-only or vanished directory
            raise Int4FormatError("could not write the quantized checkpoint; nothing was written",
                                  file=getattr(exc, "filename", None) or str(self.out),
                                  expected="a writable directory with free space",
                                  found=exc.strerror or str(exc)) from exc
        return False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.shard[name] = tensor.contiguous()
        self.shard_bytes += tensor.numel() * tensor.element_size()
        if self.shard_bytes >= SHARD_BYTES:
            self._flush()

    def add_weight(self, prefix: str, w: Int4Weight) -> None:
        for k, v in NativeFormat.layer_tensors(w).items():
            self.add(f"{prefix}.{k}", v)

    def _flush(self) -> None:
        if self.shard:
            name = f"model-{len(self.shard_files) + 1:05d}.safetensors"
            save_file(self.shard, str(self.tmp / name), metadata={"format": "pt"})
            self.shard_files.append(name)
            for k in self.shard:
                self.weight_map[k] = name
            self.shard, self.shard_bytes = {}, 0

    def finish(self, config: dict, fmt: NativeFormat, copy_from: Path) -> None:
        """Write the last shard, config.json (with ``fmt``'s quantization_config), copy the
        tokenizer and other small files of ``copy_from``, and rename into ``out``."""
        self._flush()
        tmp = self.tmp
        if len(self.shard_files) == 1:
            os.rename(tmp / self.shard_files[0], tmp / "model.safetensors")
        else:  # rename to the conventional -of- names
            final = {}
            for i, name in enumerate(self.shard_files):
                new_name = f"model-{i + 1:05d}-of-{len(self.shard_files):05d}.safetensors"
                os.rename(tmp / name, tmp / new_name)
                final[name] = new_name
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {}, "weight_map": {k: final[v] for k, v in self.weight_map.items()}},
                indent=2))
        config = dict(config, quantization_config=fmt.to_hf_config())
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for item in copy_from.iterdir():  # tokenizer, generation config, chat template, ...
            if item.name in _WEIGHT_FILES or item.suffix == ".safetensors" or item.name == "config.json":
                continue
            if item.suffix in (".bin", ".pt", ".pth", ".gguf") or item.name.startswith("."):
                continue
            if item.is_file():
                shutil.copy2(item, tmp / item.name)
        (tmp / _PID_FILE).unlink()
        _apply_umask(tmp)
        os.rename(tmp, self.out)


# Written into the temp directory while a quantize runs: a directory whose process is gone is a
# leftover of a killed run (SIGKILL leaves no chance to clean up) and is removed by the next run.
_PID_FILE = ".int4xpu-quantize.pid"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove_stale_temp_dirs(out: Path) -> None:
    """Remove temp directories of earlier runs into ``out`` whose process is gone; refuse while
    one is still writing (two runs must not race for one OUT)."""
    for d in out.parent.glob(f".{out.name}.tmp-*"):
        pid_file = d / _PID_FILE
        try:
            pid = int(pid_file.read_text())
        except (OSError, ValueError):
            pid = None
        if pid is not None and pid != os.getpid() and _pid_alive(pid):
            raise Int4FormatError("another vllm-int4xpu quantize is writing this output",
                                  file=str(d), expected="no other run into the same OUT",
                                  found=f"process {pid}")
        logger.info("removing the temp directory of an interrupted run: %s", d)
        shutil.rmtree(d, ignore_errors=True)


def _apply_umask(tmp: Path) -> None:
    """Give the checkpoint the modes any new file of this user gets (mkdtemp makes its directory
    0700 and safetensors writes 0600): directory 0777 and files 0666, less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    for f in tmp.rglob("*"):
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)
