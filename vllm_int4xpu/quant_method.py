"""The vLLM adapter: ``--quantization int4xpu`` (the only module that speaks vLLM's API).

* :class:`Int4XPUConfig` parses any supported checkpoint format (see :mod:`vllm_int4xpu.formats`)
  and, through ``override_quantization_method``, claims foreign int4 checkpoints (GPTQ, AWQ, ...)
  when the user asks for ``int4xpu``; without the flag vLLM keeps its own methods.
* :class:`Int4XPULinearMethod` creates the format's tensors as vLLM parameters (so tensor
  parallelism shards them), converts them once to the canonical weight after loading, lets the
  kernel selector pick a backend, and computes through the ``int4xpu::linear`` custom op.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any, Optional

import torch

from .errors import Int4FormatError
from .formats import (ACT_DTYPE, LEGACY_CONFIG_FILES, CheckpointFormat, LayerGeometry, TensorSpec,
                      detect_format, parse_format, with_legacy_quant_method)
from .kernels import Int4LinearSpec, select_kernel
from .kernels.ops import int4_linear
from vllm.model_executor.layers.linear import (LinearBase, LinearMethodBase,
                                               UnquantizedLinearMethod,
                                               register_weight_loader_v2_supported_method)
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.models.utils import WeightsMapper
from vllm.model_executor.parameter import (BasevLLMParameter, ChannelQuantScaleParameter,
                                           GroupQuantScaleParameter, PackedColumnParameter,
                                           PackedvLLMParameter, RowvLLMParameter)


logger = logging.getLogger("vllm.int4xpu")


@functools.lru_cache(maxsize=None)
def _moe_layer_types() -> tuple:
    """vLLM's fused-MoE layer classes (``RoutedExperts`` asks for the quant method in vLLM 0.32;
    ``FusedMoE`` in earlier releases)."""
    types = []
    try:
        from vllm.model_executor.layers.fused_moe import FusedMoE
        types.append(FusedMoE)
    except ImportError:  # pragma: no cover - depends on the vLLM release
        pass
    try:
        from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
        types.append(RoutedExperts)
    except ImportError:  # pragma: no cover - depends on the vLLM release
        pass
    return tuple(types)


def _is_fused_moe(layer: torch.nn.Module) -> bool:
    types = _moe_layer_types()
    return bool(types) and isinstance(layer, types)

NAME = "int4xpu"


def register_with_vllm() -> None:
    """Register the quantization config with vLLM (called by the plugin entry point)."""
    from vllm.model_executor.layers.quantization import (QUANTIZATION_METHODS,
                                                         register_quantization_config)

    if NAME in QUANTIZATION_METHODS:
        from vllm.model_executor.layers.quantization import get_quantization_config
        try:
            existing = get_quantization_config(NAME)
        except Exception:  # pragma: no cover - defensive
            existing = None
        if existing is not None and existing.__module__ != __name__:
            logger.warning("int4xpu: a quantization method named %r is already registered by %s; "
                           "leaving it in place", NAME, existing.__module__)
            return
        if existing is not None:
            return
    register_quantization_config(NAME)(Int4XPUConfig)


class Int4XPUConfig(QuantizationConfig):
    """int4 weight-only quantization for any supported checkpoint format."""

    def __init__(self, fmt: Optional[CheckpointFormat] = None) -> None:
        super().__init__()
        self.fmt = fmt
        self.model_dir: Optional[str] = None

    def __repr__(self) -> str:
        return f"Int4XPUConfig({self.fmt.describe() if self.fmt else 'no checkpoint format'})"

    @classmethod
    def get_name(cls) -> str:
        return NAME

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return -1

    @staticmethod
    def get_config_filenames() -> list[str]:
        # vLLM reads these only when config.json has no quantization_config (older GPTQ/AWQ
        # checkpoints); with none of them either, vLLM says "Cannot find the config file".
        return list(LEGACY_CONFIG_FILES)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Int4XPUConfig":
        return cls(parse_format(with_legacy_quant_method(config)))

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None):
        # Claim a foreign checkpoint only when the user asked for int4xpu; our own native
        # checkpoints are ours either way.
        fmt = detect_format(hf_quant_cfg)
        if fmt is None:
            return None
        if user_quant == NAME or (user_quant is None and fmt.name == NAME):
            return NAME
        return None

    def get_checkpoint_weight_mapper(self):
        # vLLM's default mapper drops ``.g_idx``; act-order checkpoints need it. Formats may
        # name metadata tensors to drop (HQQ's per-layer .shape, .nbits, ...).
        drop = getattr(self.fmt, "dropped_suffixes", ()) if self.fmt is not None else ()
        return WeightsMapper(orig_to_new_suffix={s: None for s in drop})

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None):
        self.model_dir = model_name if os.path.isdir(model_name) else None

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if _is_fused_moe(layer):
            return self._moe_method(prefix)
        if not isinstance(layer, LinearBase):
            return None
        if self.fmt is None:
            raise Int4FormatError("int4xpu needs an int4 checkpoint (make one with "
                                  "`vllm-int4xpu quantize SRC OUT`)", tensor=prefix,
                                  expected="config.json quantization_config", found=None)
        if not self._is_quantized(prefix):
            return UnquantizedLinearMethod()
        return Int4XPULinearMethod(self, prefix)

    def _moe_method(self, prefix: str):
        """Fused MoE experts: int4xpu has no MoE kernel. Experts the checkpoint left unquantized
        load through vLLM's unquantized MoE method; quantized ones are refused here by name,
        instead of failing later in vLLM's loader with an unknown parameter."""
        if self.fmt is None or self.fmt.name == "int4xpu" or not self.fmt.is_layer_quantized(prefix):
            return None  # native checkpoints never quantize MoE experts (see quantizer.py)
        raise Int4FormatError(
            f"{self.fmt.name}: int4 MoE experts are not supported by int4xpu yet; run this "
            "checkpoint without --quantization int4xpu (vLLM's own method), or list the experts "
            "in the checkpoint's skip list", file=self.model_dir or None, tensor=prefix,
            expected="dense (unquantized) experts", found="quantized experts")

    def _is_quantized(self, prefix: str) -> bool:
        # A fused vLLM layer (qkv_proj) is quantized iff its checkpoint shards are.
        last = prefix.rsplit(".", 1)[-1]
        shards = self.packed_modules_mapping.get(last)
        if not shards:
            return self.fmt.is_layer_quantized(prefix)
        base = prefix[: -len(last)]
        flags = {self.fmt.is_layer_quantized(base + s) for s in shards}
        if len(flags) > 1:
            raise Int4FormatError("fused layer has both quantized and unquantized parts",
                                  tensor=prefix, expected="all or none of " + ", ".join(shards),
                                  found="a mix")
        return flags.pop()

    def file_of(self, tensor_name: str) -> Optional[str]:
        """The checkpoint file holding ``tensor_name`` (for error messages)."""
        if not self.model_dir:
            return None
        idx = os.path.join(self.model_dir, "model.safetensors.index.json")
        if os.path.exists(idx):
            with open(idx) as f:
                wm = json.load(f).get("weight_map", {})
            return wm.get(tensor_name, os.path.basename(idx))
        single = os.path.join(self.model_dir, "model.safetensors")
        return "model.safetensors" if os.path.exists(single) else None

def _make_param(spec: TensorSpec, data: torch.Tensor, loader):
    kw = dict(data=data, weight_loader=loader)
    if spec.output_dim is not None and spec.input_dim is not None:
        if spec.packed_dim is not None:
            return PackedvLLMParameter(input_dim=spec.input_dim, output_dim=spec.output_dim,
                                       packed_dim=spec.packed_dim,
                                       packed_factor=spec.packed_factor, **kw)
        return GroupQuantScaleParameter(output_dim=spec.output_dim, input_dim=spec.input_dim, **kw)
    if spec.output_dim is not None:
        if spec.packed_dim is not None:
            return PackedColumnParameter(output_dim=spec.output_dim, packed_dim=spec.packed_dim,
                                         packed_factor=spec.packed_factor, **kw)
        return ChannelQuantScaleParameter(output_dim=spec.output_dim, **kw)
    if spec.input_dim is not None:
        return RowvLLMParameter(input_dim=spec.input_dim, **kw)
    return BasevLLMParameter(**kw)


@register_weight_loader_v2_supported_method
class Int4XPULinearMethod(LinearMethodBase):
    """Linear method: format tensors -> canonical weight -> chosen kernel backend."""

    def __init__(self, config: Int4XPUConfig, prefix: str):
        self.config = config
        self.fmt = config.fmt
        self.prefix = prefix

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes,
                       input_size, output_size, params_dtype, **extra_weight_attrs):
        geo = LayerGeometry(input_size_per_partition, sum(output_partition_sizes),
                            input_size, output_size)
        loader = extra_weight_attrs.get("weight_loader")
        specs = self.fmt.tensor_specs(geo)
        layer.int4_geometry = geo
        layer.int4_specs = specs
        layer.int4_params_dtype = params_dtype
        layer.int4_expected_loads = max(1, len(output_partition_sizes))
        for spec in specs:
            dtype = params_dtype if spec.dtype == ACT_DTYPE else spec.dtype
            data = torch.empty(spec.shape, dtype=dtype)
            param = _make_param(spec, data, self._tracking_loader(loader, spec.name, geo))
            param.int4_loads = 0
            layer.register_parameter(spec.name, param)

    def _tracking_loader(self, loader, name: str, geo: LayerGeometry):
        """Count loads per tensor (missing tensors are errors) and name bad shapes."""
        full = f"{self.prefix}.{name}"
        config = self.config
        fmt = self.fmt

        def load(param, loaded_weight, *args, **kwargs):
            param.int4_loads += 1
            try:  # formats whose disk layout vLLM cannot shard convert whole tensors first
                loaded_weight = fmt.prepare_loaded(name, loaded_weight, geo)
            except Int4FormatError as e:
                raise e.with_context(file=e.file or config.file_of(full), tensor=full) from None
            if (name.endswith("g_idx") and param.int4_loads > 1
                    and tuple(param.shape) == tuple(loaded_weight.shape)
                    and not torch.equal(param.data, loaded_weight.to(param.dtype))):
                # A fused layer (qkv, gate_up) holds one g_idx; its checkpoint shards share their
                # input, so act-order checkpoints give them one permutation. Refuse otherwise.
                raise Int4FormatError("the checkpoint shards of this fused layer carry different "
                                      "act-order g_idx", file=config.file_of(full), tensor=full,
                                      expected="one g_idx for all shards", found="different g_idx")
            try:
                return loader(param, loaded_weight, *args, **kwargs)
            except (AssertionError, RuntimeError) as e:
                raise Int4FormatError(f"tensor does not fit the layer ({e or 'shape mismatch'})",
                                      file=config.file_of(full), tensor=full,
                                      expected=f"{list(param.shape)} (this partition, {param.dtype})",
                                      found=f"{list(loaded_weight.shape)} {loaded_weight.dtype}"
                                      ) from None
        return load

    def process_weights_after_loading(self, layer) -> None:
        geo: LayerGeometry = layer.int4_geometry
        tensors = {}
        for spec in layer.int4_specs:
            param = getattr(layer, spec.name)
            if param.int4_loads == 0:
                if spec.optional:
                    continue
                full = f"{self.prefix}.{spec.name}"
                raise Int4FormatError("tensor missing from checkpoint", file=self.config.file_of(full)
                                      or self.config.model_dir, tensor=full,
                                      expected=f"{list(spec.shape)} per partition", found="nothing")
            tensors[spec.name] = param.data
        try:
            w = self.fmt.to_canonical(tensors, geo)
            w.validate(name=self.prefix)
        except Int4FormatError as e:
            raise e.with_context(file=e.file or self.config.file_of(f"{self.prefix}.qweight")) from None
        device = w.qweight.device
        spec = Int4LinearSpec.of(w, layer.int4_params_dtype, device.type)
        # a row-parallel shard of an act-order layer (uneven groups) is refused by the permuting
        # backends and runs on the reference one; the selector logs the choice and why
        kernel_cls = select_kernel(spec)
        prepared = kernel_cls(spec).prepare(w)
        for s in layer.int4_specs:
            delattr(layer, s.name)
        names = []
        for name in kernel_cls.tensor_names:
            attr = f"int4_{name}"
            layer.register_parameter(attr, torch.nn.Parameter(prepared[name], requires_grad=False))
            names.append(attr)
        layer.int4_tensor_names = tuple(names)
        layer.int4_backend = kernel_cls.name
        layer.int4_spec = spec

    def apply(self, layer, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        tensors = [getattr(layer, n) for n in layer.int4_tensor_names]
        return int4_linear(x, tensors, layer.int4_backend, layer.int4_spec, bias)



