"""Accuracy of int4 checkpoints through real vLLM: perplexity and top-1 agreement with the bf16 model.

The table in BENCHMARKS.md (SmolLM2-135M-Instruct; its bf16 directory is made by
``python examples/smollm2_model.py /work/e2e-models/smollm2-bf16``, see the README; producer
checkpoints by ``benchmarks/producers/*.py``):

    .venv/bin/python benchmarks/accuracy.py --methods rtn,hqq,gptq-ao --zero-points int,float \\
        --groups 32 64 --producer hqq-0.2.8-g64=/work/accuracy-models/hqq-g64 \\
        --producer autoround-g32=/work/accuracy-models/autoround-asym-g32 ... \\
        --out benchmarks/results/accuracy_smollm2_cpu

What it does:

* Quantizes the bf16 source model with the project CLI for every method x zero point x group
  (``vllm-int4xpu quantize SRC OUT --method M --zero-point Z --group-size G --quiet``, plus
  ``--calib FILE`` for methods that calibrate), timing each call. Checkpoints go to --work and
  are reused on a later run when a sidecar ``<dir>.quantize.json`` shows they were made from the
  same source, method, zero point, group and calibration file (its quantize time is reported
  again). A combination the quantizer refuses (exit status 2 with an ``error:`` line, e.g. HQQ
  with integer zero points) is reported as n/a with the quantizer's reason.
* Tokenizes the evaluation text once with the source model's tokenizer (no chat template, no
  special tokens), cuts it into non-overlapping windows of --window tokens (the last partial
  window is dropped) and gives every window, as token ids, to ``LLM.generate`` with
  ``SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0)``.
* Each checkpoint runs in a fresh subprocess (one vLLM engine per process; results come back in
  a temporary JSON file): the bf16 baseline (the source model, no quantization), ours and every
  --producer checkpoint with ``quantization="int4xpu"``; ``enforce_eager=True``,
  ``max_model_len = window + 16``, prefix caching off, seed 0, --dtype activations.
* From each position's prompt logprobs (position 0 of a window has none): the logprob of the
  actual next token gives the NLL; perplexity = exp(mean NLL over all predicted positions). The
  rank-1 entry vLLM returns beside the actual token is the model's argmax (on a tie, the entry
  torch.topk chose). Top-1 agreement = fraction of positions where a quantized model's argmax
  equals the bf16 model's.

Prints a markdown table (rows sorted by group, then perplexity) last; --out PREFIX writes
PREFIX.json (every number, the quantize commands, the kernel backends vLLM logged) and PREFIX.md.
Environment for the engines (set unless already set): VLLM_CPU_KVCACHE_SPACE=1,
VLLM_CPU_NUM_OF_RESERVED_CPU=0, HF_HUB_OFFLINE=1, TOKENIZERS_PARALLELISM=false.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = Path("/work/e2e-models/smollm2-bf16")
DEFAULT_TEXT = REPO / "benchmarks" / "data" / "eval_text.txt"
DEFAULT_WORK = Path(tempfile.gettempdir()) / "int4xpu-accuracy"
METHODS = ("rtn", "hqq", "gptq", "gptq-ao")
# method name in the table -> the CLI's --method plus flags
METHOD_FLAGS = {"gptq-ao": ["--method", "gptq", "--act-order"]}
ZERO_POINTS = ("int", "float")
CALIBRATION_FREE = {"rtn", "hqq"}  # --calib is passed to the other methods only
BACKEND_LINE = "int4xpu: kernel backend"
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
              "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# --------------------------------------------------------------------------- child: one engine
def child(spec_file: str) -> None:
    """Run one checkpoint over every window; write per-position NLL and argmax to spec['result']."""
    spec = json.loads(Path(spec_file).read_text())
    windows = json.loads(Path(spec["windows"]).read_text())
    from vllm import LLM, SamplingParams

    t = time.perf_counter()
    max_len = len(windows[0]) + 16
    llm = LLM(model=spec["model"], quantization=spec["quantization"], dtype=spec["dtype"],
              enforce_eager=True, max_model_len=max_len, max_num_batched_tokens=max_len,
              enable_prefix_caching=False, seed=0)
    load_s = time.perf_counter() - t
    sp = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0, detokenize=False)
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": w} for w in windows], sp, use_tqdm=False)
    eval_s = time.perf_counter() - t
    nll, argmax = [], []
    for w, out in zip(windows, outs):
        plp = out.prompt_logprobs
        for pos in range(1, len(w)):
            entries = plp[pos]  # {token id: Logprob}: the actual token first, then the top-1
            nll.append(-entries[w[pos]].logprob)
            argmax.append([tok for tok, lp in entries.items() if lp.rank == 1][-1])
    Path(spec["result"]).write_text(json.dumps({
        "method": llm.llm_engine.vllm_config.model_config.quantization,
        "load_s": load_s, "eval_s": eval_s, "nll": nll, "argmax": argmax}))


# --------------------------------------------------------------------------- parent
def run_engine(model: Path, quantization, windows_file: Path, dtype: str, timeout: int,
               log_file: Path) -> dict:
    env = dict(os.environ)
    for k, v in ENGINE_ENV.items():
        env.setdefault(k, v)
    with tempfile.TemporaryDirectory(prefix="int4xpu-acc-") as tmp:
        spec = Path(tmp) / "spec.json"
        result = Path(tmp) / "result.json"
        spec.write_text(json.dumps({"model": str(model), "quantization": quantization,
                                    "dtype": dtype, "windows": str(windows_file),
                                    "result": str(result)}))
        t = time.time()
        try:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child",
                                   str(spec)], capture_output=True, text=True, timeout=timeout,
                                  env=env)
            log, rc = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            log = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                          for x in (e.stdout, e.stderr)) + f"\n[timed out after {timeout}s]"
            rc = "timeout"
        wall = time.time() - t
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text(log)
        backends = sorted({ln.split(BACKEND_LINE, 1)[1].strip() for ln in log.splitlines()
                           if BACKEND_LINE in ln})
        if rc == 0 and result.exists():
            res = json.loads(result.read_text())
            res.update(ok=True)
        else:
            res = {"ok": False, "error": f"engine rc={rc} (log: {log_file})", "tail": log[-3000:]}
    res.update(wall_s=wall, kernel_backends=backends, log=str(log_file))
    return res


def _stderr_reason(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.startswith("error:") or ": error:" in ln]
    return (errs or lines or ["(no output)"])[-1][:300]


def quantize(cli: Path, src: Path, out: Path, method: str, zero_point: str, group: int,
             calib: Path | None, timeout: int) -> dict:
    """Make (or reuse) one of our checkpoints; {'status': ok|n/a|failed, 'quantize_s', ...}."""
    use_calib = calib is not None and method not in CALIBRATION_FREE
    key = {"src": str(src.resolve()), "method": method, "zero_point": zero_point, "group": group,
           "calib": str(calib.resolve()) if use_calib else None}
    sidecar = out.with_name(out.name + ".quantize.json")
    if (out / "config.json").exists() and sidecar.exists():
        rec = json.loads(sidecar.read_text())
        if rec.get("key") == key:
            return {**rec, "status": "ok", "reused": True}
    if out.exists():  # stale or unfinished: --work belongs to this script
        shutil.rmtree(out)
    sidecar.unlink(missing_ok=True)
    base = [str(cli), "quantize", str(src), str(out), "--zero-point", zero_point,
            "--group-size", str(group), "--quiet"] + (["--calib", str(calib)] if use_calib else [])

    def call(cmd):
        t = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            return p.returncode, p.stdout + p.stderr, time.perf_counter() - t
        except subprocess.TimeoutExpired:
            return "timeout", f"error: timed out after {timeout}s", time.perf_counter() - t

    cmd = base + METHOD_FLAGS.get(method, ["--method", method])
    rc, log, secs = call(cmd)
    if rc == 0 and (out / "config.json").exists():
        rec = {"key": key, "command": cmd, "quantize_s": secs}
        sidecar.write_text(json.dumps(rec, indent=1))
        return {**rec, "status": "ok", "reused": False}
    reason = _stderr_reason(log)
    # argparse and Int4FormatError both exit 2 with an "error:" line: the quantizer said no.
    refused = rc == 2 and "error:" in log
    return {"key": key, "command": cmd, "status": "n/a" if refused else "failed",
            "reason": reason if refused else f"rc={rc}: {reason}", "tail": log[-2000:],
            "quantize_s": None}


def describe_checkpoint(cli: Path, path: Path) -> dict:
    """Group size and zero-point kind of a producer checkpoint, from ``vllm-int4xpu inspect``."""
    p = subprocess.run([str(cli), "inspect", str(path), "--json"], capture_output=True, text=True)
    try:
        d = json.loads(p.stdout)
    except json.JSONDecodeError:
        return {"format": None, "group": None, "zero_point": None,
                "inspect_error": _stderr_reason(p.stdout + p.stderr)}
    return {"format": d.get("format"), "group": d.get("group_size"),
            "zero_point": d.get("zero_point"), "inspect_problems": d.get("problems", [])[:5]}


def tokenize_windows(model: Path, text_file: Path, window: int) -> tuple[list[list[int]], int]:
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()  # "longer than the model's maximum length"
    tok = AutoTokenizer.from_pretrained(str(model))
    ids = tok(text_file.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    n = len(ids) // window
    return [ids[i * window:(i + 1) * window] for i in range(n)], len(ids)


def _f(v, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "n/a"


def _group(g) -> str:
    return "per-channel" if g == -1 else ("-" if g is None else str(g))


def _sort_key(r: dict):
    g = r.get("group")
    ppl = r.get("ppl")
    return (r["kind"] != "bf16", math.inf if g in (None, -1) else g, g == -1,
            ppl if isinstance(ppl, float) else math.inf, r["name"])


def table(rows: list[dict]) -> str:
    lines = ["| checkpoint | group | zero point | ppl | ppl / bf16 | top-1 agree % | quantize s |",
             "|---|---|---|---|---|---|---|"]
    notes = []
    for r in sorted(rows, key=_sort_key):
        ok = r.get("ok")
        qs = "-" if r["kind"] != "ours" else _f(r.get("quantize_s"), ".1f")
        if r["kind"] == "ours" and r.get("reused"):
            qs += " (reused)"
        if not ok:
            why = r.get("reason") or r.get("error") or "failed"
            notes.append(f"* {r['name']}: {r.get('status', 'failed')} ({why})")
        lines.append(f"| {r['name']} | {_group(r.get('group'))} | {r.get('zero_point') or '-'} "
                     f"| {_f(r.get('ppl'), '.3f') if ok else r.get('status', 'failed')} "
                     f"| {_f(r.get('ppl_ratio'), '.4f')} | {_f(r.get('top1_agree_pct'), '.2f')} "
                     f"| {qs} |")
    return "\n".join(lines + ([""] + notes if notes else []))


def meta(a, n_text_tokens: int, windows: list) -> dict:
    import torch

    try:
        from importlib.metadata import version
        vllm_version = version("vllm-cpu")
    except Exception:
        vllm_version = None
    cpuinfo = Path("/proc/cpuinfo")
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                if ln.startswith("model name")), None) if cpuinfo.exists() else platform.processor()
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": sys.argv, "vllm_cpu": vllm_version,
            "torch": torch.__version__, "cpu": cpu, "cores": os.cpu_count(),
            "env": {k: os.environ.get(k, v) for k, v in ENGINE_ENV.items()},
            "model": str(a.model), "text": str(a.text), "text_tokens": n_text_tokens,
            "window": a.window, "windows": len(windows),
            "positions": len(windows) * (a.window - 1), "dtype": a.dtype, "enforce_eager": True,
            "max_model_len": a.window + 16, "seed": 0}


def _listarg(values: list[str], conv=str) -> list:
    """Accept both ``--x a b`` and ``--x a,b``."""
    return [conv(v) for item in values for v in item.split(",") if v]


def _producer(s: str) -> tuple[str, Path]:
    name, sep, path = s.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {s!r}")
    return name, Path(path)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL if DEFAULT_MODEL.exists() else None,
                    help="bf16 source model directory (the baseline and what we quantize); "
                         f"default {DEFAULT_MODEL} if it exists. `python examples/smollm2_model.py "
                         "DIR` builds the SmolLM2 one")
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT,
                    help=f"evaluation text, UTF-8 (default {DEFAULT_TEXT.relative_to(REPO)})")
    ap.add_argument("--methods", nargs="+", default=[",".join(METHODS)],
                    help=f"quantization methods among {','.join(METHODS)} (comma- or space-"
                         "separated; default all)")
    ap.add_argument("--zero-points", nargs="+", default=[",".join(ZERO_POINTS)],
                    help="zero-point kinds among int,float (default both); combinations the "
                         "quantizer refuses are reported n/a")
    ap.add_argument("--groups", nargs="+", default=["32", "64", "128"],
                    help="group sizes (default 32 64 128; -1 = per output channel)")
    ap.add_argument("--producer", action="append", type=_producer, default=[], metavar="NAME=DIR",
                    help="a pre-built int4 checkpoint from another producer, served with "
                         "quantization='int4xpu' (repeatable), e.g. "
                         "autoround-g64=/work/accuracy-models/autoround-asym-g64")
    ap.add_argument("--calib", type=Path,
                    help="calibration text passed to `quantize --calib` for methods that "
                         f"calibrate (not {', '.join(sorted(CALIBRATION_FREE))})")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK,
                    help="where our checkpoints are written and reused from; this script owns "
                         f"it and replaces stale checkpoints there (default {DEFAULT_WORK})")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="vLLM activation dtype for every engine, bf16 baseline included "
                         "(default float32)")
    ap.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    ap.add_argument("--out", help="write PREFIX.json and PREFIX.md")
    ap.add_argument("--timeout", type=int, default=3600,
                    help="seconds per engine subprocess and per quantize call (default 3600)")
    return ap


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        return child(sys.argv[2])
    a = build_parser().parse_args()
    methods = _listarg(a.methods)
    zero_points = _listarg(a.zero_points)
    groups = _listarg(a.groups, int)
    bad = [m for m in methods if m not in METHODS] + [z for z in zero_points if z not in ZERO_POINTS]
    if bad:
        raise SystemExit(f"unknown methods/zero points {bad}")
    if a.model is None or not (a.model / "config.json").exists():
        raise SystemExit(f"--model {a.model}: not a model directory (build the SmolLM2 one with "
                         "`python examples/smollm2_model.py DIR`)")
    if not a.text.exists():
        raise SystemExit(f"--text {a.text} does not exist")
    for name, path in a.producer:
        if not (path / "config.json").exists():
            raise SystemExit(f"--producer {name}={path}: no config.json there")
    cli = Path(sys.executable).parent / "vllm-int4xpu"
    if not cli.exists():
        raise SystemExit(f"{cli} not found: run from the project's venv (pip install -e .)")
    from tqdm import tqdm

    windows, n_tokens = tokenize_windows(a.model, a.text, a.window)
    if not windows:
        raise SystemExit(f"{a.text}: {n_tokens} tokens, fewer than one --window of {a.window}")
    a.work.mkdir(parents=True, exist_ok=True)
    result = {"meta": meta(a, n_tokens, windows), "rows": []}
    print(f"{a.text}: {n_tokens} tokens -> {len(windows)} windows of {a.window} "
          f"({result['meta']['positions']} predicted positions); dtype {a.dtype}", flush=True)

    jobs = [{"name": "bf16", "kind": "bf16", "path": a.model, "quantization": None,
             "group": None, "zero_point": None}]
    jobs += [{"name": f"{m} / {z} / g{g}", "kind": "ours", "method": m, "zero_point": z, "group": g,
              "path": a.work / f"{a.model.name}-{m}-{z}-g{g}", "quantization": "int4xpu"}
             for m in methods for z in zero_points for g in groups]
    jobs += [{"name": n, "kind": "producer", "path": p, "quantization": "int4xpu",
              **describe_checkpoint(cli, p)} for n, p in a.producer]

    def save():
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out + ".json").write_text(json.dumps(result, indent=1, default=str))

    base = None
    tmp = tempfile.TemporaryDirectory(prefix="int4xpu-acc-")
    windows_file = Path(tmp.name) / "windows.json"  # what every engine subprocess reads
    windows_file.write_text(json.dumps(windows))
    bar = tqdm(jobs, desc="checkpoints", unit="ckpt")
    for job in bar:
        bar.set_postfix_str(job["name"])
        row = dict(job, path=str(job["path"]))
        result["rows"].append(row)
        if job["kind"] == "ours":
            q = quantize(cli, a.model, job["path"], job["method"], job["zero_point"], job["group"],
                         a.calib, a.timeout)
            row.update(q)
            if q["status"] != "ok":
                row["ok"] = False
                tqdm.write(f"{job['name']}: quantize {q['status']}: {q['reason']}")
                save()
                continue
            tqdm.write(f"{job['name']}: quantized in {q['quantize_s']:.1f}s"
                       + (" (reused)" if q["reused"] else ""))
        log = a.work / "logs" / (job["name"].replace(" / ", "-").replace("/", "_") + ".log")
        r = run_engine(job["path"], job["quantization"], windows_file, a.dtype, a.timeout, log)
        nll, argmax = r.pop("nll", None), r.pop("argmax", None)
        row.update(r)
        if not r["ok"]:
            row["status"] = "failed"
            tqdm.write(f"{job['name']}: FAILED {r['error']}\n{r['tail'][-2000:]}")
            save()
            continue
        row["status"] = "ok"
        row["mean_nll"] = sum(nll) / len(nll)
        row["ppl"] = math.exp(row["mean_nll"])
        if job["kind"] == "bf16":
            base = {"ppl": row["ppl"], "argmax": argmax}
        if base is not None:
            row["ppl_ratio"] = row["ppl"] / base["ppl"]
            row["top1_agree_pct"] = 100.0 * sum(x == y for x, y in zip(argmax, base["argmax"])) \
                / len(argmax)
        tqdm.write(f"{job['name']}: ppl {row['ppl']:.3f}, top-1 agree "
                   f"{_f(row.get('top1_agree_pct'), '.2f')}%, engine load {r['load_s']:.0f}s, "
                   f"eval {r['eval_s']:.0f}s, wall {r['wall_s']:.0f}s; vLLM method {r['method']!r}"
                   + "".join(f"\n  {BACKEND_LINE} {b}" for b in r["kernel_backends"]))
        save()
    bar.close()
    tmp.cleanup()

    m = result["meta"]
    md = table(result["rows"])
    head = (f"Accuracy through vLLM {m['vllm_cpu']} ({m['dtype']} activations, eager): "
            f"{Path(m['model']).name}, {Path(m['text']).name} = {m['text_tokens']} tokens, "
            f"{m['windows']} windows of {m['window']} ({m['positions']} predicted positions). "
            "top-1 agree = argmax equal to the bf16 model's.")
    save()
    if a.out:
        Path(a.out + ".md").write_text(f"```\n{' '.join(sys.argv)}\n```\n\n{head}\n\n{md}\n")
        print(f"wrote {a.out}.json and {a.out}.md")
    print(f"\n{head}\n\n{md}", flush=True)


if __name__ == "__main__":
    main()
