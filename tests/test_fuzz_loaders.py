"""Property-based fuzzing of every checkpoint loader (hypothesis, seeded, bounded).

Each case takes a valid checkpoint of one format (the producer-written fixtures, a native one
written by our quantizer), breaks it in one way and validates it offline with
:func:`vllm_int4xpu.inspect.check_checkpoint` (the conversion loading runs). The property:

* no exception escapes but :class:`Int4FormatError` (collected as the report's problems): never
  a torch/safetensors/Python error, never a crash;
* a break that can only be wrong (a truncated or reshaped tensor, a float tensor where codes
  belong, NaN/inf in scales or float zero points, zero points or g_idx out of range, a missing
  required tensor, bits != 4, a group size that does not fit, an unknown checkpoint format, a
  truncated file, a missing shard or index entry) is reported, and every problem names file,
  tensor, expected and found;
* a break that may be a valid variant (a float dtype changed to another float dtype, an
  optional tensor dropped, a boolean flipped) either loads cleanly or is reported as above.

A sample of the must-refuse cases also goes through real vLLM loading
(``test_fuzz_sample_through_vllm``). The default run tries FUZZ_EXAMPLES cases per format
family (``-m slow``: 10x); ``FUZZ_REPORT`` prints the tally.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from vllm_int4xpu.errors import Int4FormatError  # noqa: E402
from vllm_int4xpu.inspect import check_checkpoint  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
FAMILIES = ["gptq_v1_asym_descact_g32", "gptq_v2_sym_descact_g64", "ar_gptq_sym_g128",
            "ar_awq_asym_g128", "ct_asym_g64_gptq", "ct_asym_actgroup_g32", "ct_sym_channel",
            "ar_native_gptq_asym_g32", "hqq_g64", "torchao_plain_int32_g64", "torchao_plain_g128",
            "moe_ar_gptq_asym_g32", "moe_hqq_g32", "native_int", "native_float"]
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))
TALLY: Counter = Counter()
BROKEN: list = []  # the key each tensor break touched (for the failure message)
SOURCE_DIRS: dict = {}  # family -> its checkpoint directory (tokenizer files for vLLM)

MUST_REFUSE = "refuse"
MAY_LOAD = "any"


# ---------------------------------------------------------------------------- the checkpoints
@pytest.fixture(scope="module")
def sources(tiny_dir, tmp_path_factory) -> dict[str, tuple[dict, dict, dict]]:
    """family -> (config.json, tensors, quantized-module -> its tensor names)."""
    from vllm_int4xpu.quantizer import quantize_model

    root = tmp_path_factory.mktemp("fuzz-src")
    dirs = {f: FIXTURES / f for f in FAMILIES if (FIXTURES / f).is_dir()}
    dirs["native_int"] = quantize_model(tiny_dir, root / "ni", 64, "int", progress=False)
    dirs["native_float"] = quantize_model(tiny_dir, root / "nf", 32, "float", progress=False)
    out = {}
    SOURCE_DIRS.update(dirs)
    for fam, d in dirs.items():
        cfg = json.loads((d / "config.json").read_text())
        tensors = {}
        for f in sorted(d.glob("*.safetensors")):
            tensors.update(load_file(str(f)))
        rep = check_checkpoint(str(d), "cpu")
        assert not rep.problems, (fam, rep.problems)
        mods: dict[str, list[str]] = {}
        primary = {"gptq": "qweight", "awq": "qweight", "int4xpu": "qweight",
                   "compressed-tensors": "weight_packed", "hqq": "W_q",
                   "torchao": "_weight_qdata"}[rep.fmt.name if rep.fmt.name in (
                       "gptq", "awq", "int4xpu", "compressed-tensors", "hqq", "torchao")
                       else "gptq" if "qweight" in " ".join(tensors) else "awq"]
        for k in tensors:
            mod, _, leaf = k.rpartition(".")
            if f"{mod}.{primary}" in tensors:
                mods.setdefault(mod, []).append(leaf)
        out[fam] = (cfg, tensors, mods)
    return out


def _write(d: Path, cfg: dict, tensors: dict, shards: int = 1) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    if shards == 1:
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        return
    keys = sorted(tensors)
    wm = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::shards]}
        save_file(part, str(d / name), metadata={"format": "pt"})
        wm.update({k: name for k in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))


# ---------------------------------------------------------------------------- the breaks
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
INTS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
OPTIONAL_LEAVES = {"g_idx", "weight_g_idx", "weight_shape", "bias", "shape"}


def _break_tensor(draw, t: dict, mods: dict) -> tuple[str, str]:
    mod = draw(st.sampled_from(sorted(mods)))
    leaf = draw(st.sampled_from(sorted(mods[mod])))
    key = f"{mod}.{leaf}"
    x = t[key]
    BROKEN.append(key)
    kind = draw(st.sampled_from(["dtype", "truncate", "extra_dim", "nonfinite", "range",
                                 "delete", "g_idx_length"]))
    meta = x.dim() == 0 or leaf in ("shape", "weight_shape") or x.dtype == torch.uint8 and x.dim() <= 1
    if kind == "dtype":
        new = draw(st.sampled_from([d for d in FLOATS + INTS if d != x.dtype]))
        t[key] = x.to(new)
        same_kind = x.is_floating_point() == t[key].is_floating_point()
        # integer codes cast to a narrower integer type change value: corrupt, not a variant
        lossless = x.is_floating_point() or torch.equal(t[key].to(x.dtype), x)
        return kind, MAY_LOAD if meta or (same_kind and lossless) else MUST_REFUSE
    if kind == "truncate" and x.dim() >= 1 and x.numel() > 1:
        dim = draw(st.integers(0, x.dim() - 1))
        if x.shape[dim] > 1:
            cut = draw(st.integers(1, x.shape[dim] - 1))
            t[key] = x.narrow(dim, 0, cut).contiguous()
            return kind, MAY_LOAD if meta else MUST_REFUSE
    if kind == "extra_dim" and not meta:
        t[key] = x.unsqueeze(0).contiguous()
        return kind, MUST_REFUSE
    if kind == "nonfinite" and x.is_floating_point() and x.numel():
        y = x.clone()
        y.view(-1)[draw(st.integers(0, x.numel() - 1))] = draw(st.sampled_from(
            [float("nan"), float("inf"), float("-inf")]))
        t[key] = y
        return kind, MUST_REFUSE
    if kind == "range" and x.numel() and not x.is_floating_point() and not meta:
        y = x.clone()
        i = draw(st.integers(0, x.numel() - 1))
        if "g_idx" in leaf:
            y.view(-1)[i] = draw(st.sampled_from([-1, 10**6]))
            t[key] = y
            return kind, MUST_REFUSE
        if x.dtype == torch.int8 and leaf in ("qzeros", "_weight_zero_point"):
            y.view(-1)[i] = draw(st.sampled_from([-1, 16, 100]))  # unpacked int zero points
            t[key] = y
            return kind, MUST_REFUSE
        y.view(-1)[i] = draw(st.integers(-2**31, 2**31 - 1)) if x.dtype == torch.int32 else 0
        t[key] = y  # packed words: any bit pattern is a code
        return kind, MAY_LOAD
    if kind == "delete":
        del t[key]
        return kind, MAY_LOAD if leaf in OPTIONAL_LEAVES or meta else MUST_REFUSE
    if kind == "g_idx_length" and "g_idx" in leaf:
        t[key] = torch.cat([x, x[:1]])
        return kind, MUST_REFUSE
    return "none", MAY_LOAD


def _break_config(draw, cfg: dict) -> tuple[str, str]:
    q = cfg.get("quantization_config") or cfg.setdefault("quantization_config", {})
    field = draw(st.sampled_from(["bits", "group_size", "flag", "format", "drop_method",
                                  "method_type", "drop_key"]))
    if field == "bits" and ("bits" in q or "num_bits" in json.dumps(q)):
        v = draw(st.sampled_from([2, 3, 8, "4", None, [4]]))
        _set_everywhere(q, ("bits", "num_bits", "nbits", "w_bit"), v)
        return "config.bits", MUST_REFUSE
    if field == "group_size" and "group_size" in json.dumps(q):
        # a per-channel compressed-tensors scheme (strategy channel) ignores group_size
        ignored = '"strategy": "channel"' in json.dumps(q)
        v = draw(st.sampled_from([0, -2, 3, 48, 1000, "64", 1.5]))
        _set_everywhere(q, ("group_size", "q_group_size"), v)
        return "config.group_size", MAY_LOAD if ignored else MUST_REFUSE
    if field == "flag":
        keys = [k for k, v in q.items() if isinstance(v, bool)]
        if keys:
            k = draw(st.sampled_from(sorted(keys)))
            q[k] = draw(st.sampled_from([not q[k], "yes", 1]))
            return f"config.{k}", MAY_LOAD
    if field == "format" and ("checkpoint_format" in q or "format" in q):
        v = draw(st.sampled_from(["marlin", "gptq_v3", 5, None]))
        _set_everywhere(q, ("checkpoint_format", "format"), v)  # compressed-tensors: per group too
        return "config.format", MAY_LOAD if v is None else MUST_REFUSE
    if field == "drop_method":
        q.pop("quant_method", None)
        return "config.quant_method", MUST_REFUSE
    if field == "method_type":
        q["quant_method"] = draw(st.sampled_from([5, "gptq_marlin", "", ["gptq"]]))
        return "config.quant_method_type", MUST_REFUSE
    if field == "drop_key" and q:
        k = draw(st.sampled_from(sorted(q)))
        q.pop(k)
        return f"config.drop_{k}", MUST_REFUSE if k == "quant_method" else MAY_LOAD
    return "none", MAY_LOAD


def _set_everywhere(d, names, value) -> None:
    if isinstance(d, dict):
        for k in list(d):
            if k in names:
                d[k] = value
            else:
                _set_everywhere(d[k], names, value)
    elif isinstance(d, list):
        for x in d:
            _set_everywhere(x, names, value)


@st.composite
def broken_checkpoint(draw, sources):
    fam = draw(st.sampled_from(sorted(sources)))
    cfg, tensors, mods = sources[fam]
    cfg = json.loads(json.dumps(cfg))
    t = dict(tensors)
    where = draw(st.sampled_from(["tensor", "tensor", "tensor", "config", "file"]))
    shards = 1
    if where == "tensor":
        what, expect = _break_tensor(draw, t, mods)
        what = f"{what}:{BROKEN[-1]}"
    elif where == "config":
        what, expect = _break_config(draw, cfg)
    else:
        what = draw(st.sampled_from(["truncated_file", "missing_shard", "index_entry"]))
        # a missing index entry is harmless while its file is still listed (loaders read every
        # tensor of each listed file); a missing shard or a cut file is not
        expect = MAY_LOAD if what == "index_entry" else MUST_REFUSE
        shards = 1 if what == "truncated_file" else 2
    return Case(fam, cfg, t, shards, what, expect, draw(st.integers(1, 2**20)))


class Case(tuple):
    """One broken checkpoint; its repr names the break, not the tensors."""

    def __new__(cls, *fields):
        return super().__new__(cls, fields)

    def __repr__(self):
        return f"Case({self[0]}, {self[4]}, expect={self[5]}, seed={self[6]})"


def _apply_file_break(d: Path, what: str, seed: int) -> None:
    if what == "truncated_file":
        f = d / "model.safetensors"
        data = f.read_bytes()
        f.write_bytes(data[: seed % max(1, len(data) - 1)])
    elif what == "missing_shard":
        next(iter(sorted(d.glob("model-*.safetensors")))).unlink()
    elif what == "index_entry":
        idx = d / "model.safetensors.index.json"
        j = json.loads(idx.read_text())
        keys = sorted(k for k in j["weight_map"] if not k.endswith((".weight", ".bias")))
        j["weight_map"].pop(keys[seed % len(keys)])
        idx.write_text(json.dumps(j))


def check_case(case, tmp: Path) -> str:
    """Run one case; returns its outcome ('refused' or 'loaded'); raises on a property failure."""
    fam, cfg, t, shards, what, expect, seed = case
    d = tmp / f"case-{seed}"
    shutil.rmtree(d, ignore_errors=True)
    _write(d, cfg, t, shards)
    if what in ("truncated_file", "missing_shard", "index_entry"):
        _apply_file_break(d, what, seed)
    try:
        rep = check_checkpoint(str(d), "cpu")
    except Exception as e:  # noqa: BLE001 - the property under test
        raise AssertionError(f"{fam} / {what}: {type(e).__name__} escaped: {e}") from e
    finally:
        shutil.rmtree(d, ignore_errors=True)
    for p in rep.problems:
        assert isinstance(p, Int4FormatError), (fam, what, p)
        missing = [a for a in ("file", "tensor", "expected") if getattr(p, a) is None]
        missing += [] if "; found=" in str(p) else ["found"]
        assert not missing, f"{fam} / {what}: problem lacks {missing}: {p}"
    if expect == MUST_REFUSE:
        assert rep.problems, f"{fam} / {what}: a broken checkpoint was accepted"
    outcome = "refused" if rep.problems else "unchanged" if what.startswith("none") else "loaded"
    TALLY[(fam, what, outcome)] += 1
    return outcome


def _fuzz(sources, examples: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="int4xpu-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    try:
        @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=broken_checkpoint(sources))
        def run(case):
            check_case(case, tmp)
        run()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if os.environ.get("FUZZ_REPORT"):
        for k, n in sorted(TALLY.items()):
            print(*k, n)
    print(f"fuzz: {sum(TALLY.values())} cases, "
          f"{sum(n for k, n in TALLY.items() if k[2] == 'refused')} refused with Int4FormatError, "
          f"{sum(n for k, n in TALLY.items() if k[2] == 'loaded')} loaded as valid variants, "
          f"{sum(n for k, n in TALLY.items() if k[2] == 'unchanged')} drew a break that did not "
          "apply (left unchanged)")


def test_fuzz_every_loader(sources):
    _fuzz(sources, FUZZ_EXAMPLES * len(sources))


@pytest.mark.slow
def test_fuzz_every_loader_long(sources):
    _fuzz(sources, 10 * FUZZ_EXAMPLES * len(sources))


# ---------------------------------------------------------------------------- through vLLM
def _vllm_cases(sources) -> dict:
    """Deterministic must-refuse breaks, one per format family kind."""
    def tensor_break(fam, key_end, fn):
        cfg, t, _ = sources[fam]
        t = dict(t)
        key = sorted(k for k in t if k.endswith(key_end))[0]
        t[key] = fn(t[key])
        return fam, cfg, t, 1, None

    def nan(x):
        y = x.clone()
        y.view(-1)[0] = float("nan")
        return y
    zp = lambda x: torch.full_like(x, 17)  # noqa: E731 - unpacked int8 zero points out of range
    cases = {
        "gptq truncated qweight": tensor_break("gptq_v1_asym_descact_g32", "o_proj.qweight",
                                               lambda x: x[:-1].contiguous()),
        "awq NaN scales": tensor_break("ar_awq_asym_g128", "down_proj.scales", nan),
        "native zero points out of range": tensor_break("native_int", "q_proj.qzeros", zp),
        "hqq W_q as float": tensor_break("hqq_g64", "v_proj.W_q", lambda x: x.float()),
        "moe expert scales truncated": tensor_break("moe_ar_gptq_asym_g32",
                                                    "experts.2.up_proj.scales",
                                                    lambda x: x[:, :-8].contiguous()),
    }
    cfg, t, _ = sources["ct_asym_g64_gptq"]
    bad = json.loads(json.dumps(cfg))
    _set_everywhere(bad["quantization_config"], ("num_bits",), 8)
    cases["compressed-tensors bits 8"] = ("ct_asym_g64_gptq", bad, t, 1, None)
    cfg, t, _ = sources["hqq_g64"]
    cases["hqq missing shard"] = ("hqq_g64", cfg, t, 2, "missing_shard")
    return cases


def test_fuzz_sample_through_vllm(sources, tmp_path, monkeypatch):
    """A sample of the breaks through real vLLM loading: each ends in our Int4FormatError."""
    from test_formats_e2e import run_batch

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the loader's exception is ours
    cases = _vllm_cases(sources)
    jobs = []
    for i, (name, (fam, cfg, t, shards, file_break)) in enumerate(cases.items()):
        d = tmp_path / f"case{i}"
        _write(d, cfg, t, shards)
        for f in SOURCE_DIRS[fam].iterdir():
            if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json",
                                                           "generation_config.json"):
                shutil.copy(f, d / f.name)
        if file_break:
            _apply_file_break(d, file_break, 1)
        jobs.append({"model": str(d), "quantization": "int4xpu"})
    res = run_batch(jobs)
    for (name, _), r in zip(cases.items(), res):
        assert not r["ok"], (name, "loaded")
        # config errors surface while vLLM validates its config: pydantic wraps our ValueError
        # subclass and keeps its message ("Value error, <ours>")
        assert r["error"].startswith("Int4FormatError") or (
            r["error"].startswith("ValidationError") and "Value error, " in r["error"]), \
            (name, r["error"][-1500:])
        for part in ("file=", "tensor=", "expected=", "found="):
            assert part in r["error"], (name, part, r["error"])
