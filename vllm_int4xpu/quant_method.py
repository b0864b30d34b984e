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
import re
from typing import Any, Optional

import torch

from .errors import Int4FormatError
from .formats import (ACT_DTYPE, LEGACY_CONFIG_FILES, CheckpointFormat, LayerGeometry, TensorSpec,
                      detect_format, parse_format, with_legacy_quant_method)
from .kernels import Int4LinearSpec, select_kernel
from .kernels.ops import int4_linear, int4_moe
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
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
        # what vLLM built with a method of ours (filled while the model is constructed; the
        # checkpoint mapper uses it to find quantized layers vLLM builds without one)
        self.linear_prefixes: set[str] = set()
        self.moe_prefixes: dict[str, int] = {}  # MoE layer prefix -> number of experts
        self.hf_to_vllm = None  # the model's checkpoint -> vLLM name mapper (apply_vllm_mapper)
        self._disk_index: Optional[dict[str, dict[str, str]]] = None  # see _disk_modules
        self._disk_index_mapped = False  # built with the model's name mapper
        self._dense_logged: set[str] = set()

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
        # name metadata tensors to drop (HQQ's per-layer .shape, .nbits, ...). The mapper also
        # rewrites the weight stream (see CheckpointStream): quantized layers that vLLM builds
        # without a quantization method are dequantized, and expert indices are checked.
        drop = getattr(self.fmt, "dropped_suffixes", ()) if self.fmt is not None else ()
        return Int4WeightsMapper(orig_to_new_suffix={s: None for s in drop}, config=self)

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        self.hf_to_vllm = hf_to_vllm_mapper

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None):
        self.model_dir = model_name if os.path.isdir(model_name) else None

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if _is_fused_moe(layer):
            return self._moe_method(layer, prefix)
        if not isinstance(layer, LinearBase):
            return None
        self.linear_prefixes.add(prefix)
        if self.fmt is None:
            raise Int4FormatError("int4xpu needs an int4 checkpoint (make one with "
                                  "`vllm-int4xpu quantize SRC OUT`)", tensor=prefix,
                                  expected="config.json quantization_config", found=None)
        if not self._is_quantized(prefix):
            return UnquantizedLinearMethod()
        return Int4XPULinearMethod(self, prefix)

    def _moe_method(self, layer, prefix: str):
        """Fused MoE experts: int4 experts get :class:`Int4XPUMoEMethod`; experts the checkpoint
        left unquantized load through vLLM's unquantized MoE method (None)."""
        if self.fmt is None:
            return None
        quantized = {n: self._layer_quantized(n) for n in _expert_module_names(layer, prefix)}
        flags = set(quantized.values())
        if len(flags) > 1:
            raise Int4FormatError("some experts of this MoE layer are quantized and some are not",
                                  file=self.model_dir or None, tensor=prefix,
                                  expected="all experts int4 or all unquantized",
                                  found=", ".join(n for n, q in quantized.items() if q)[:300])
        if not flags.pop():
            return None
        self.moe_prefixes[prefix] = layer.global_num_experts
        return Int4XPUMoEMethod(self, layer.moe_config, prefix)

    def _is_quantized(self, prefix: str) -> bool:
        # A fused vLLM layer (qkv_proj) is quantized iff its checkpoint shards are.
        last = prefix.rsplit(".", 1)[-1]
        shards = self.packed_modules_mapping.get(last)
        if not shards:
            return self._layer_quantized(prefix)
        base = prefix[: -len(last)]
        flags = {self._layer_quantized(base + s) for s in shards}
        if len(flags) > 1:
            raise Int4FormatError("fused layer has both quantized and unquantized parts",
                                  tensor=prefix, expected="all or none of " + ", ".join(shards),
                                  found="a mix")
        return flags.pop()

    def _layer_quantized(self, name: str) -> bool:
        if not self.fmt.is_layer_quantized(name):
            return False
        if self._stored_dense(name):
            kind = re.sub(r"\.\d+\.", ".N.", name)
            if kind not in self._dense_logged:  # once per kind of layer, not per layer
                self._dense_logged.add(kind)
                logger.info("int4xpu: %s is stored unquantized in the checkpoint (a float .weight) "
                            "though its quantization config does not exclude it; layers like it "
                            "load unquantized", name)
            return False
        return True

    def _stored_dense(self, module: str) -> bool:
        """True when the checkpoint holds ``module`` as a plain float ``.weight`` (and maybe a
        ``.bias``) and no tensor of a quantized layout: a layer its producer left unquantized
        without listing it (the routers of Qwen3-MoE, which vLLM 0.32 builds with the
        quantization method, in checkpoints whose config names no skipped modules)."""
        leaves = self._disk_modules().get(module)
        return leaves is not None and leaves.get("weight") in _FLOAT_DTYPES \
            and set(leaves) <= {"weight", "bias"}

    def _disk_modules(self) -> dict[str, dict[str, str]]:
        """module name -> {tensor leaf: safetensors dtype} of the local checkpoint (headers
        only), under the names on disk and, where the model maps them, vLLM's names."""
        from safetensors import safe_open

        from .inspect import safetensors_files

        mapper = self.hf_to_vllm
        if self._disk_index is None or (mapper is not None and not self._disk_index_mapped):
            self._disk_index, self._disk_index_mapped = {}, mapper is not None
            try:
                files = safetensors_files(self.model_dir) if self.model_dir else []
            except (OSError, ValueError, KeyError):  # a broken index: the loader reports it
                files = []
            for f in files:
                try:
                    with safe_open(os.path.join(self.model_dir, f), "pt") as sf:
                        items = [(n, sf.get_slice(n).get_dtype()) for n in sf.keys()]
                except Exception:  # an unreadable file is reported by the loader itself
                    continue
                for n, dt in items:
                    names = {n, mapper._map_name(n) if mapper is not None else None} - {None}
                    for m in names:
                        if "." in m:
                            mod, leaf = m.rsplit(".", 1)
                            self._disk_index.setdefault(mod, {})[leaf] = dt
        return self._disk_index

    def file_of(self, tensor_name: str) -> Optional[str]:
        """The checkpoint file holding ``tensor_name`` (for error messages)."""
        if not self.model_dir:
            return None
        idx = os.path.join(self.model_dir, "model.safetensors.index.json")
        if os.path.exists(idx):
            with open(idx) as f:
                wm = json.load(f).get("weight_map", {})
            return wm.get(tensor_name) or wm.get("model." + tensor_name) or os.path.basename(idx)
        single = os.path.join(self.model_dir, "model.safetensors")
        return "model.safetensors" if os.path.exists(single) else None


_FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")


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


def _install_prepared(layer, kernel_cls, prepared: dict, spec, prefix: str,
                      op_args: Optional[tuple] = None) -> None:
    """Keep a backend's prepared tensors as the layer's parameters (``prefix`` + name, in the
    backend's order) and what ``apply`` needs to call it (``op_args``: see ``int4_linear``)."""
    names = []
    for name in kernel_cls.tensor_names:
        layer.register_parameter(prefix + name, torch.nn.Parameter(prepared[name], requires_grad=False))
        names.append(prefix + name)
    layer.int4_tensor_names = tuple(names)
    layer.int4_backend = kernel_cls.name
    layer.int4_spec = spec
    layer.int4_op_args = op_args
    if next(iter(prepared.values())).device.type == "cpu":
        _release_freed_host_memory()


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim`` (None elsewhere, e.g. musl or macOS)."""
    import ctypes
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def _release_freed_host_memory() -> None:
    """Hand the heap pages freed by a layer's conversion (the loaded tensors it replaced) back
    to the OS. glibc keeps freed multi-MB chunks in its heap once its mmap threshold has grown,
    so without this a CPU load kept ~0.45 GB of dead weights resident on a 1.1B model
    (tests/test_load_memory.py)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


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
        bias = getattr(layer, "bias", None)
        if isinstance(bias, torch.Tensor) and not torch.isfinite(bias).all():
            full = f"{self.prefix}.bias"
            raise Int4FormatError("bias is not finite", file=self.config.file_of(full)
                                  or self.config.model_dir, tensor=full, expected="finite values",
                                  found=f"{int((~torch.isfinite(bias)).sum())} NaN/inf")
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
        kernel = kernel_cls(spec)
        prepared = kernel.prepare(w)
        for s in layer.int4_specs:
            delattr(layer, s.name)
        _install_prepared(layer, kernel_cls, prepared, spec, "int4_", kernel.op_args())
        # vLLM finds a quantized layer's device through its ``qweight`` (MLA's kv_b_proj, which
        # it then dequantizes by calling apply on an identity; LoRA): the backend's first tensor,
        # as a plain attribute (not a second parameter)
        layer.qweight = getattr(layer, layer.int4_tensor_names[0]).data

    def apply(self, layer, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        tensors = [getattr(layer, n) for n in layer.int4_tensor_names]
        return int4_linear(x, tensors, layer.int4_backend, layer.int4_spec, bias,
                           layer.int4_op_args)




# ------------------------------------------------------------------------------ mixture of experts
def _expert_projections(layer) -> tuple[str, str, str]:
    """Checkpoint names of an expert's gate, up and down projections (Mixtral: w1, w3, w2)."""
    return (layer.ckpt_gate_proj_name, layer.ckpt_up_proj_name, layer.ckpt_down_proj_name)


def _expert_module_names(layer, prefix: str) -> list[str]:
    gate, up, down = _expert_projections(layer)
    return [f"{prefix}.{e}.{p}" for e in range(layer.global_num_experts) for p in (gate, up, down)]


_SHARDS = {"w1": 0, "w3": 1}  # gate, up -> index in the w13 parameters


class Int4XPUMoEMethod(FusedMoEMethodBase):
    """Fused-MoE method: per-expert format tensors -> stacked canonical experts -> MoE backend.

    Each format tensor ``t`` of a projection becomes the parameters ``w13_t`` [E, 2, *shape]
    (gate, up) and ``w2_t`` [E, *shape] (down), with this method's own weight loader: it runs the
    format's load hook on the whole checkpoint tensor, cuts this rank's tensor-parallel slice
    (gate/up along their output dim, down along its input dim, as the format's TensorSpec says)
    and records what arrived. After loading, every expert is converted with the format's
    ``to_canonical`` and validated, gate and up are fused, the experts stacked, and the MoE kernel
    selector picks a backend; the layer then computes through ``int4xpu::moe``.
    """

    def __init__(self, config: Int4XPUConfig, moe, prefix: str):
        super().__init__(moe)
        self.config = config
        self.fmt = config.fmt
        self.prefix = prefix

    # ------------------------------------------------------------------ weights
    def create_weights(self, layer, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype,
                       **extra_weight_attrs):
        par = layer.moe_config.moe_parallel_config
        if par.use_ep:
            raise Int4FormatError("int4xpu MoE does not support expert parallelism",
                                  tensor=self.prefix, expected="tensor parallelism only",
                                  found="enable_expert_parallel")
        if not layer.moe_config.is_act_and_mul:
            raise Int4FormatError("int4xpu MoE needs a gated activation (act(gate) * up)",
                                  tensor=self.prefix, expected="a gated MoE",
                                  found=str(layer.moe_config.activation))
        H, I = hidden_size, intermediate_size_per_partition
        I_full = I * par.tp_size
        # per-projection geometries: gate/up are column parallel, down is row parallel
        geo13 = LayerGeometry(H, I, H, I_full)
        geo2 = LayerGeometry(I, H, I_full, H)
        layer.int4_moe = dict(geo13=geo13, geo2=geo2, E=num_experts, H=H, I=I,
                              tp_rank=par.tp_rank, tp_size=par.tp_size, dtype=params_dtype,
                              specs13=self.fmt.tensor_specs(geo13),
                              specs2=self.fmt.tensor_specs(geo2), loaded=set())
        for stem, specs, lead in (("w13", layer.int4_moe["specs13"], (num_experts, 2)),
                                  ("w2", layer.int4_moe["specs2"], (num_experts,))):
            for spec in specs:
                dtype = params_dtype if spec.dtype == ACT_DTYPE else spec.dtype
                param = torch.nn.Parameter(torch.zeros(*lead, *spec.shape, dtype=dtype),
                                           requires_grad=False)
                param.weight_loader = self._weight_loader(layer, stem, spec)
                layer.register_parameter(f"{stem}_{spec.name}", param)

    def _ckpt_name(self, layer, expert: int, shard_id: str, tensor: str) -> str:
        gate, up, down = _expert_projections(layer)
        proj = {"w1": gate, "w3": up, "w2": down}[shard_id]
        return f"{self.prefix}.{expert}.{proj}.{tensor}"

    def _weight_loader(self, layer, stem: str, spec: TensorSpec):
        info = layer.int4_moe
        fmt, config = self.fmt, self.config

        def load(param, loaded_weight, weight_name="", shard_id="", expert_id=0,
                 return_success=False, **_):
            e = layer._map_global_expert_id_to_local_expert_id(expert_id)
            if e == -1:
                return False if return_success else None
            full = self._ckpt_name(layer, expert_id, shard_id, spec.name)
            if (stem == "w2") != (shard_id == "w2") or shard_id not in ("w1", "w2", "w3"):
                raise Int4FormatError("expert tensor routed to the wrong projection",
                                      file=config.file_of(full), tensor=full,
                                      expected=f"shard of {stem}", found=shard_id)
            geo = info["geo2"] if stem == "w2" else info["geo13"]
            try:
                t = fmt.prepare_loaded(spec.name, loaded_weight, geo)
            except Int4FormatError as err:
                raise err.with_context(file=err.file or config.file_of(full), tensor=full) from None
            # this rank's slice: gate/up along their output dim, down along its input dim
            dim = spec.input_dim if stem == "w2" else spec.output_dim
            if dim is not None and info["tp_size"] > 1:
                size = spec.shape[dim]
                if t.dim() <= dim or t.shape[dim] != size * info["tp_size"]:
                    raise Int4FormatError("expert tensor does not fit the layer", file=config.file_of(full),
                                          tensor=full, expected=f"{size * info['tp_size']} along dim {dim}",
                                          found=list(t.shape))
                t = t.narrow(dim, info["tp_rank"] * size, size)
            dst = param.data[e, _SHARDS[shard_id]] if stem == "w13" else param.data[e]
            if tuple(t.shape) != tuple(dst.shape) or (t.is_floating_point() and not dst.is_floating_point()):
                raise Int4FormatError("expert tensor does not fit the layer", file=config.file_of(full),
                                      tensor=full, expected=f"{list(dst.shape)} {dst.dtype} (this partition)",
                                      found=f"{list(t.shape)} {t.dtype}")
            dst.copy_(t)
            info["loaded"].add((spec.name, stem, e, shard_id))
            return True if return_success else None
        return load

    # ------------------------------------------------------------------ after loading
    def _expert_weight(self, layer, e: int, shard_id: str):
        info = layer.int4_moe
        stem = "w2" if shard_id == "w2" else "w13"
        specs = info["specs2"] if stem == "w2" else info["specs13"]
        tensors = {}
        for spec in specs:
            if (spec.name, stem, e, shard_id) not in info["loaded"]:
                if spec.optional:
                    continue
                full = self._ckpt_name(layer, e, shard_id, spec.name)
                raise Int4FormatError("expert tensor missing from checkpoint",
                                      file=self.config.file_of(full) or self.config.model_dir,
                                      tensor=full, expected=f"{list(spec.shape)} per partition",
                                      found="nothing")
            p = getattr(layer, f"{stem}_{spec.name}").data
            tensors[spec.name] = p[e, _SHARDS[shard_id]] if stem == "w13" else p[e]
        geo = info["geo2"] if stem == "w2" else info["geo13"]
        name = self._ckpt_name(layer, e, shard_id, "")[:-1]
        try:
            return self.fmt.to_canonical(tensors, geo).validate(name=name)
        except Int4FormatError as err:
            t = err.tensor if err.tensor and err.tensor.startswith(name) else \
                f"{name}.{err.tensor}" if err.tensor else name
            raise err.with_context(file=err.file or self.config.file_of(t), tensor=t) from None

    def process_weights_after_loading(self, layer) -> None:
        from .kernels.moe_base import Int4MoESpec
        from .kernels.selector import select_moe_kernel
        from .weight import Int4Experts, concat_out_features, widest_zero_kind

        info = layer.int4_moe
        if layer.apply_router_weight_on_input:
            raise Int4FormatError("int4xpu MoE applies router weights to the expert outputs",
                                  tensor=self.prefix, expected="apply_router_weight_on_input=False",
                                  found=True)
        w13, w2 = [], []
        for e in range(info["E"]):
            gate, up = self._expert_weight(layer, e, "w1"), self._expert_weight(layer, e, "w3")
            w13.append(concat_out_features([gate, up], name=self._ckpt_name(layer, e, "w1", "")[:-1]))
            w2.append(self._expert_weight(layer, e, "w2"))
        kind = widest_zero_kind(w13 + w2)
        s13, s2 = Int4Experts.stack(w13, kind), Int4Experts.stack(w2, kind)
        device = s13.qweight.device
        activation = getattr(layer.activation, "value", str(layer.activation))
        spec = Int4MoESpec.of(s13, s2, info["dtype"], device.type, activation)
        kernel_cls = select_moe_kernel(spec)
        prepared = kernel_cls(spec).prepare(s13, s2)
        for stem in ("w13", "w2"):
            for sp in info["specs13" if stem == "w13" else "specs2"]:
                delattr(layer, f"{stem}_{sp.name}")
        _install_prepared(layer, kernel_cls, prepared, spec, "int4_moe_")
        del layer.int4_moe

    def get_fused_moe_quant_config(self, layer):
        return None

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts=None,
              shared_experts_input=None):
        tensors = [getattr(layer, n) for n in layer.int4_tensor_names]
        return int4_moe(x, tensors, topk_weights, topk_ids, layer.int4_backend, layer.int4_spec)


# ------------------------------------------------------------------------------ weight stream
class Int4WeightsMapper(WeightsMapper):
    """vLLM's name mapper plus :class:`CheckpointStream` on the weights it maps.

    vLLM merges the quantization config's mapper into the model's own with ``|``; ``__ror__``
    and ``__or__`` keep the merged mapper of this type, so :meth:`apply` still runs the stream."""

    def __init__(self, *args, config: "Int4XPUConfig", **kwargs):
        super().__init__(*args, **kwargs)
        self.config = config

    def _like(self, merged: WeightsMapper) -> "Int4WeightsMapper":
        fields = {f: getattr(merged, f) for f in merged.__dataclass_fields__}
        return Int4WeightsMapper(**fields, config=self.config)

    def __or__(self, other):
        return self._like(WeightsMapper.__or__(self, other))

    def __ror__(self, other):
        return self._like(WeightsMapper.__or__(other, self))

    def apply(self, weights):
        return super().apply(CheckpointStream(self.config).rewrite(weights))


def _readable(weights, cfg: "Int4XPUConfig"):
    """vLLM's (name, tensor) iterator, with a file it cannot read (missing shard, truncated or
    not safetensors) reported as our error naming it instead of the reader's own exception."""
    from safetensors import SafetensorError

    it = iter(weights)
    last = None
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except (OSError, SafetensorError) as e:
            raise Int4FormatError("checkpoint file cannot be read", file=getattr(e, "filename", None)
                                  or cfg.model_dir, tensor=f"(after {last})" if last else "(first tensor)",
                                  expected="every file of the checkpoint, complete",
                                  found=f"{type(e).__name__}: {e}"[:300]) from e
        last = item[0]
        yield item


class CheckpointStream:
    """Checks and rewrites the checkpoint's (name, tensor) stream before vLLM maps the names.

    * A tensor of expert ``e`` of a MoE layer with E experts, ``e >= E``, is an error naming the
      file (vLLM's expert loader would drop it without a word).
    * A quantized layer that vLLM builds without a quantization method (HQQ quantizes MoE
      routers ``mlp.gate`` and ``shared_expert_gate``, which vLLM builds as plain layers) is
      dequantized once, here, into the ``<layer>.weight`` vLLM expects: its format tensors are
      collected, converted with the format's own conversion, validated, and replaced by one
      float tensor. A layer whose tensors never complete is an error, never dropped.
    """

    _EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.")

    def __init__(self, config: "Int4XPUConfig"):
        self.config = config
        self.fmt = config.fmt
        names = set()
        if self.fmt is not None:
            from .inspect import _probe_geometry
            specs = self.fmt.tensor_specs(LayerGeometry(*_probe_geometry(self.fmt)))
            self.required = {s.name for s in specs if not s.optional}
            names = {s.name for s in specs}
            if getattr(self.fmt, "name", "") == "hqq":
                self.required.add("shape")  # its (N, K): the layer's size on disk
            names |= {x.lstrip(".") for x in getattr(self.fmt, "dropped_suffixes", ())}
            names |= self.required
        self.format_names = names
        self.claimed = {t for c in self._claimed_prefixes() for t in self._tails(c)}
        self.moe_tails = {t: (p, n) for p, n in config.moe_prefixes.items() for t in self._tails(p)}

    def _claimed_prefixes(self) -> set[str]:
        """vLLM names of the layers built with a method of ours, fused layers' parts included."""
        cfg = self.config
        claimed = set(cfg.linear_prefixes)
        for p in cfg.linear_prefixes:
            base, _, last = p.rpartition(".")
            for shard in (cfg.packed_modules_mapping or {}).get(last, ()):
                claimed.add(f"{base}.{shard}" if base else shard)
        return claimed

    def _vllm_name(self, name: str) -> str:
        m = self.config.hf_to_vllm
        if m is None:
            return name
        try:
            mapped = m.map_name(name)
        except Exception:  # pragma: no cover - a mapper of another vLLM release
            mapped = None
        return mapped or name

    @staticmethod
    def _tails(name: str) -> list[str]:
        """``name`` and every dotted tail of it: a model's inner loader may see names without
        their leading parts (Mixtral's sees ``layers.0...`` for ``model.layers.0...``)."""
        parts = name.split(".")
        return [".".join(parts[i:]) for i in range(len(parts))]

    def _moe_layer(self, name: str):
        """(MoE layer prefix, its experts, expert index) when ``name`` is an expert's tensor."""
        m = self._EXPERT.match(name)
        hit = self.moe_tails.get(m.group(1)) if m else None
        return (hit[0], hit[1], int(m.group(2))) if hit else None

    def _is_unclaimed_quantized(self, module: str, leaf: str) -> bool:
        if leaf not in self.format_names:
            return False
        vname = self._vllm_name(module + "." + leaf)
        return not (self._moe_layer(vname) or vname.rsplit(".", 1)[0] in self.claimed)

    def rewrite(self, weights):
        cfg = self.config
        pending: dict[str, dict[str, Any]] = {}
        for name, tensor in _readable(weights, cfg):
            hit = self._moe_layer(self._vllm_name(name))
            if hit and hit[2] >= hit[1]:
                raise Int4FormatError("checkpoint has more experts than the model config",
                                      file=cfg.file_of(name), tensor=name,
                                      expected=f"expert index < {hit[1]} (config num_experts)",
                                      found=hit[2])
            module, _, leaf = name.rpartition(".")
            if self.fmt is None or not module or not self._is_unclaimed_quantized(module, leaf):
                yield name, tensor
                continue
            parts = pending.setdefault(module, {})
            parts[leaf] = tensor
            if self.required <= parts.keys():
                yield module + ".weight", self._dequantize(module, pending.pop(module))
        for module, parts in pending.items():  # never completed
            if not (parts.keys() & self.required - {"shape"}):
                for leaf, tensor in parts.items():  # metadata only: not a quantized layer
                    yield f"{module}.{leaf}", tensor
                continue
            missing = sorted(self.required - parts.keys())
            raise Int4FormatError("quantized layer is incomplete in the checkpoint",
                                  file=cfg.file_of(f"{module}.{sorted(parts)[0]}") or cfg.model_dir,
                                  tensor=f"{module}.{missing[0]}", expected=sorted(self.required),
                                  found=sorted(parts))

    def _dequantize(self, module: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        from .inspect import infer_shape
        from .weight import dequantize
        try:
            K, N = infer_shape(self.fmt, parts)
            w = self.fmt.disk_to_canonical(parts, K, N).validate(name=module)
        except Int4FormatError as e:
            raise e.with_context(file=e.file or self.config.file_of(f"{module}.{sorted(parts)[0]}"),
                                 tensor=e.tensor if (e.tensor or "").startswith(module)
                                 else f"{module}.{e.tensor or ''}") from None
        logger.info("int4xpu: %s is quantized in the checkpoint but vLLM builds it without a "
                    "quantization method: dequantized once at load (%d x %d)", module, N, K)
        return dequantize(w, torch.float32)
