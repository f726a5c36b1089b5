"""Build arctic-inference (what vLLM's suffix decoding imports) from its PyPI
source into .cache/arctic-inference, without installing anything into the
project's venv.

Why a script: vLLM 0.32 asks for arctic-inference 0.1.1, and PyPI has only
source distributions of it (binary wheels exist only for 0.0.x); its declared
build environment pins torch==2.7.0 (a multi-GB CUDA wheel) although the part
vLLM needs, the C++ suffix tree (`arctic_inference.suffix_decoding._C`, built
with nanobind), does not use torch at all. So this script:

  1. makes a throwaway build venv (.cache/arctic-build/venv) that sees the
     project venv's packages (torch included) through a .pth file and gets
     the build tools (cmake, ninja, nanobind, grpcio-tools);
  2. runs `pip wheel --no-build-isolation --no-deps arctic-inference==VERSION`
     there (the CUDA custom ops are only built when
     ARCTIC_INFERENCE_PRECOMPILED_OPS is set, so a CPU machine builds the
     suffix tree only: about a minute);
  3. unpacks the wheel into .cache/arctic-inference.

offline_sweep.py and serve_bench.py put that folder on PYTHONPATH for the
`suffix` method only (or pass --suffix-pythonpath). arctic-inference also
declares a vLLM plugin; it stays inert unless ARCTIC_INFERENCE_ENABLED=1.

  python benchmarks/arctic_overlay.py            # build (skipped if present)
  python benchmarks/arctic_overlay.py --check    # import test only
"""

from __future__ import annotations

import argparse
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OVERLAY = REPO / ".cache" / "arctic-inference"
BUILD = REPO / ".cache" / "arctic-build"
VERSION = "0.1.1"  # the version vLLM 0.32 names in its error message
BUILD_TOOLS = ["setuptools", "wheel", "ninja", "cmake", "nanobind==2.9.2", "grpcio-tools"]


def check(overlay: Path = OVERLAY) -> str:
    code = ("import arctic_inference.suffix_decoding as s, importlib.metadata as m; "
            "print('arctic-inference', m.version('arctic_inference'), s.SuffixDecodingCache.__name__)")
    r = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(overlay), "PATH": "/usr/bin:/bin"},
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"arctic-inference overlay at {overlay} does not import:\n{r.stderr[-2000:]}")
    return r.stdout.strip()


def build(version: str = VERSION, overlay: Path = OVERLAY, force: bool = False) -> Path:
    if overlay.is_dir() and not force:
        print(check(overlay), "(already built)")
        return overlay
    venv = BUILD / "venv"
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # the build venv sees the project venv's packages (torch: setup.py imports it for a cmake path)
    sp = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        capture_output=True, text=True, check=True).stdout.strip()
    (Path(sp) / "project_venv.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", *BUILD_TOOLS], check=True)
    wheels = BUILD / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    # CMake's FindPython must pick the build venv's python (which has nanobind), not
    # whatever `python3` comes first on PATH (e.g. an activated project venv)
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": "2", "VIRTUAL_ENV": str(venv),
           "PATH": os.pathsep.join([str(venv / "bin"), os.environ.get("PATH", "")]),
           "CMAKE_ARGS": f"-DPython_EXECUTABLE={py} -DPython_FIND_VIRTUALENV=ONLY"}
    subprocess.run([str(py), "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-binary",
                    "arctic-inference", f"arctic-inference=={version}", "-w", str(wheels)], check=True, env=env)
    whl = next(wheels.glob("arctic_inference-*.whl"))
    tmp = overlay.with_name(overlay.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(whl) as z:
        z.extractall(tmp)
    for so in tmp.rglob("*.so"):
        so.chmod(0o755)
    shutil.rmtree(overlay, ignore_errors=True)
    tmp.rename(overlay)
    print(check(overlay), f"-> {overlay}")
    return overlay


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", default=VERSION)
    ap.add_argument("--out", type=Path, default=OVERLAY)
    ap.add_argument("--force", action="store_true", help="rebuild even if the overlay exists")
    ap.add_argument("--check", action="store_true", help="only check that the overlay imports")
    a = ap.parse_args(argv)
    if a.check:
        print(check(a.out))
    else:
        build(a.version, a.out, a.force)


if __name__ == "__main__":
    main()
