"""Quantize a bf16/fp16/fp32 Hugging Face model directory into a native ``int4xpu`` checkpoint.

Round-to-nearest, per-group scales. Which tensors are quantized is decided from the model's own
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
from pathlib import Path
from typing import Iterable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import Int4FormatError
from .formats.base import _module_matches
from .formats.native import NativeFormat
from .weight import ZeroKind, quantize_rtn

logger = logging.getLogger("vllm_int4xpu.quantize")
SHARD_BYTES = 2 * 1024**3
DEFAULT_SKIP = ("lm_head",)
# Module names vLLM's MoE models create unquantized (ReplicatedLinear(..., quant_config=None)
# routers); matched like skip entries (see formats.base._module_matches).
MOE_UNQUANTIZED = ("gate", "router", "shared_expert_gate")
# A per-expert projection weight as checkpoints store it (experts.{e}.<proj>.weight).
_EXPERT_WEIGHT = re.compile(r"(^|\.)experts\.\d+\.[^.]+\.weight$")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def linear_weight_names(src: Path) -> set[str]:
    """Names of the ``<module>.weight`` tensors to quantize: those of ``nn.Linear`` modules of
    the model, plus every 2-D per-expert projection weight on disk (transformers 5 holds the
    experts as fused 3-D parameters in memory, not as ``nn.Linear`` modules)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(src)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = {f"{name}.weight" for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    for f in _safetensors_files(src):
        with safe_open(f, "pt") as sf:
            names |= {n for n in sf.keys() if _EXPERT_WEIGHT.search(n)
                      and len(sf.get_slice(n).get_shape()) == 2}
    return names


def _safetensors_files(src: Path) -> list[Path]:
    idx = src / "model.safetensors.index.json"
    if idx.exists():
        files = sorted(set(json.loads(idx.read_text())["weight_map"].values()))
        return [src / f for f in files]
    single = src / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(src.glob("*.safetensors"))
    if not found:
        raise Int4FormatError("no safetensors weights in the source model", file=str(src),
                              expected="model.safetensors or an index", found=os.listdir(src))
    return found


def _is_skipped(tensor_name: str, skip: Iterable[str]) -> bool:
    """The loader's own rule (a name, a dotted suffix or path component, a glob, 're:' regex)."""
    module = tensor_name.rsplit(".", 1)[0]
    return any(_module_matches(module, s) for s in skip)


def moe_skips(linear_names: Iterable[str]) -> list[str]:
    """The MOE_UNQUANTIZED entries that match a linear layer of this model (none for dense)."""
    return [s for s in MOE_UNQUANTIZED if any(_is_skipped(n, [s]) for n in linear_names)]


def quantize_model(src_dir: str | os.PathLike, out_dir: str | os.PathLike, group_size: int = 64,
                   zero_point: str = "int", skip: Iterable[str] = DEFAULT_SKIP,
                   scale_dtype: Optional[torch.dtype] = None, progress: bool = True) -> Path:
    """Write the native int4xpu checkpoint of ``src_dir`` to ``out_dir``; returns ``out_dir``.

    ``zero_point``: "int" (asymmetric integer zero points), "float" (float zero points) or
    "none" (symmetric). ``group_size`` -1 is per-channel.
    """
    from tqdm.auto import tqdm

    src, out = Path(src_dir).resolve(), Path(out_dir).resolve()
    zero_kind = ZeroKind(zero_point)
    if not (src / "config.json").exists():
        raise Int4FormatError("source is not a Hugging Face model directory", file=str(src / "config.json"),
                              expected="config.json", found="missing")
    if out.exists():
        raise Int4FormatError("output directory already exists; refusing to overwrite", file=str(out),
                              expected="a new path", found="existing path")
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
    linears = linear_weight_names(src)
    moe = [s for s in moe_skips(linears) if s not in skip]
    if moe:
        logger.info("MoE routers stay unquantized (vLLM builds them without a quantization "
                    "method): skipping modules named %s", ", ".join(moe))
        skip += moe
    files = _safetensors_files(src)

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    (tmp / _PID_FILE).write_text(str(os.getpid()))
    try:
        to_quantize = []
        for f in files:
            with safe_open(f, "pt") as sf:
                to_quantize += [n for n in sf.keys() if n in linears and not _is_skipped(n, skip)]
        bar = tqdm(total=len(to_quantize), desc="quantizing", unit="layer", disable=not progress)
        weight_map: dict[str, str] = {}
        shard: dict[str, torch.Tensor] = {}
        shard_bytes, shard_files = 0, []

        def flush():
            nonlocal shard, shard_bytes
            if shard:
                name = f"model-{len(shard_files) + 1:05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                shard_files.append(name)
                for k in shard:
                    weight_map[k] = name
                shard, shard_bytes = {}, 0

        for f in files:
            with safe_open(f, "pt") as sf:
                for name in sf.keys():
                    t = sf.get_tensor(name)
                    if name in linears and not _is_skipped(name, skip):
                        prefix = name[: -len(".weight")]
                        try:
                            w = quantize_rtn(t, group_size, zero_kind, scale_dtype=scale_dtype)
                        except Int4FormatError as e:
                            raise e.with_context(file=str(f), tensor=name) from None
                        new = {f"{prefix}.{k}": v.contiguous() for k, v in NativeFormat.layer_tensors(w).items()}
                        bar.update(1)
                    else:
                        new = {name: t.contiguous()}
                    for k, v in new.items():
                        shard[k] = v
                        shard_bytes += v.numel() * v.element_size()
                    if shard_bytes >= SHARD_BYTES:
                        flush()
        flush()
        bar.close()
        if len(shard_files) == 1:
            os.rename(tmp / shard_files[0], tmp / "model.safetensors")
        else:
            # rename to the conventional -of- names
            final = {}
            for i, name in enumerate(shard_files):
                new_name = f"model-{i + 1:05d}-of-{len(shard_files):05d}.safetensors"
                os.rename(tmp / name, tmp / new_name)
                final[name] = new_name
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {}, "weight_map": {k: final[v] for k, v in weight_map.items()}}, indent=2))

        fmt = NativeFormat(group_size=group_size, zero_kind=zero_kind,
                           skip_modules=sorted(set(skip)))
        config["quantization_config"] = fmt.to_hf_config()
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for item in src.iterdir():  # tokenizer, generation config, chat template, ...
            if item.name in _WEIGHT_FILES or item.suffix == ".safetensors" or item.name == "config.json":
                continue
            if item.suffix in (".bin", ".pt", ".pth", ".gguf") or item.name.startswith("."):
                continue
            if item.is_file():
                shutil.copy2(item, tmp / item.name)
        (tmp / _PID_FILE).unlink()
        _apply_umask(tmp)
        os.rename(tmp, out)
    except OSError as e:  # disk full, read-only or vanished directory: nothing partial is left
        shutil.rmtree(tmp, ignore_errors=True)
        raise Int4FormatError("could not write the quantized checkpoint; nothing was written",
                              file=getattr(e, "filename", None) or str(out),
                              expected="a writable directory with free space",
                              found=e.strerror or str(e)) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


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
