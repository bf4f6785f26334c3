"""Build script of dreambooth-kernels (metadata lives in pyproject.toml).

The CUDA extension dbkernels._C (csrc/*.cu + csrc/*.cpp) is built only when
  * DBK_SKIP_CUDA_BUILD is not "1",
  * torch is importable (use `pip install --no-build-isolation`, torch installed first),
  * torch is a CUDA build (torch.version.cuda is not None), and
  * a CUDA toolkit is found (torch.utils.cpp_extension.CUDA_HOME is not None).
Otherwise the package installs as pure Python and the CUDA backend can still be
JIT-built on first use (dbkernels/_ext.py). TORCH_CUDA_ARCH_LIST picks the GPU
architectures; unset, it defaults to "8.6;9.0" (RTX 30xx and H100).
"""
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCH_LIST = "8.6;9.0"
# Accurate math on purpose: no --use_fast_math (the kernels must match the reference).
NVCC_FLAGS = ["-O3", "-lineinfo"]
CXX_FLAGS = ["-O3"]


def _say(msg: str) -> None:
    print(f"dreambooth-kernels: {msg}", file=sys.stderr)


def cuda_extension():
    """([CUDAExtension], {"build_ext": BuildExtension}) or ([], {}) with a printed reason."""
    if os.environ.get("DBK_SKIP_CUDA_BUILD", "") == "1":
        _say("CUDA extension dbkernels._C skipped: DBK_SKIP_CUDA_BUILD=1")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as e:  # noqa: BLE001 - any failure means we cannot build against torch
        _say(f"CUDA extension dbkernels._C skipped: torch is not importable ({type(e).__name__}: {e}); "
             "install torch first and use `pip install --no-build-isolation`")
        return [], {}
    if torch.version.cuda is None:
        _say(f"CUDA extension dbkernels._C skipped: torch {torch.__version__} is a CPU build "
             "(torch.version.cuda is None)")
        return [], {}
    if cpp_extension.CUDA_HOME is None:
        _say("CUDA extension dbkernels._C skipped: no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
        return [], {}
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    csrc = ROOT / "csrc"
    # setuptools wants source paths relative to setup.py.
    # every kernel (<op>.cu) and every binding file (ops.cpp, <op>_ops.cpp)
    sources = [p.relative_to(ROOT).as_posix() for p in sorted(csrc.glob("*.cu")) + sorted(csrc.glob("*.cpp"))]
    _say(f"building CUDA extension dbkernels._C for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} "
         f"(torch {torch.__version__}, CUDA {torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME})")
    ext = cpp_extension.CUDAExtension(
        name="dbkernels._C",
        sources=sources,
        include_dirs=[str(csrc)],
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


class BuildPyWithSources(build_py):
    """Also puts csrc/ into the built package as dbkernels/csrc, where dbkernels/_ext.py looks for the sources of
    a JIT build in an installed (non-editable) copy; an editable install finds csrc/ beside the package."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "dbkernels" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for src in sorted((ROOT / "csrc").iterdir()):
            if src.suffix in CSRC_SUFFIXES:
                self.copy_file(str(src), str(target / src.name))


CSRC_SUFFIXES = {".cu", ".cuh", ".cpp", ".h"}
ext_modules, cmdclass = cuda_extension()
cmdclass = {**cmdclass, "build_py": BuildPyWithSources}

setup(
    # Folders that do not exist (yet) are simply not found.
    packages=find_packages(
        where=str(ROOT),
        include=["dbkernels", "dbkernels.*", "trainer", "trainer.*", "bench", "bench.*"],
    ),
    # The built-in tiny model and judge (trainer/world/assets, ~16 MB), the architectures `dbtrain estimate
    # --arch` builds (trainer/memory/arch_configs) and the attention kernels' tuned configs ship inside the
    # package (each is read beside its module); csrc/ is copied in by BuildPyWithSources.
    package_data={"trainer.world": ["assets/*/*", "assets/*/*/*"], "trainer.memory": ["arch_configs/*.json"],
                  "dbkernels.ops.attention": ["curated_configs.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
