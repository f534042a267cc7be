"""Build and install dito_fast.

The C++ extension ``dito_fast._C`` is built from csrc/ when C++ sources exist there: CPU
kernels always; CUDA kernels when torch was built with CUDA and nvcc is found
(``DITO_FAST_USE_CUDA`` overrides: auto, or 1/on/true/yes, or 0/off/false/no). Install with
``pip install --no-build-isolation -e .`` (or ``.``) so the build sees the installed torch.
Without torch at build time (pip's default isolated build environment has none) building fails
with that advice, unless ``DITO_FAST_PURE_PYTHON=1`` asks for the pure-Python package (the ops
then use their other backends); an sdist needs no torch. Next to the extension the build writes
``_C.build.json`` (the torch it was built against, a digest of csrc/), which dito_fast.ops._cpp
checks when it loads the extension.
"""

import glob
import hashlib
import json
import os
import platform
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def _say(msg: str) -> None:
    print(f"[dito_fast setup] {msg}", file=sys.stderr)


# The oldest torch (major, minor) the extension is built and tested against (2.11 and 2.13 were):
# install_requires asks for it, and a build against an older one stops saying so.
MIN_TORCH = (2, 11)

# The C++ standard of every unit, C++ and CUDA: torch 2.13 builds its extensions with C++20, and its
# headers use C++20 features (warnings under C++17). scripts/check_cuda.sh and CMakeLists.txt use it too.
CXX_STD = "-std=c++20"
OPTIMIZE = ["-O3", "-g0"]

# DITO_FAST_SANITIZE: a comma-separated list of GCC/Clang sanitizers (address, undefined, ...) built
# into every C++ unit (not nvcc's host code) and the link, every error fatal
# (scripts/sanitize_check.sh runs the tests so).
_SANITIZERS = ("address", "undefined", "leak", "thread")


def sanitizer_flags(value: str) -> list:
    names = [n.strip().lower() for n in value.split(",") if n.strip()]
    bad = [n for n in names if n not in _SANITIZERS]
    if bad:
        raise ValueError(f"DITO_FAST_SANITIZE={value!r}: unknown sanitizer(s) {', '.join(bad)}; "
                         f"expected a comma-separated list of {', '.join(_SANITIZERS)}")
    if "thread" in names and set(names) & {"address", "leak"}:
        raise ValueError(f"DITO_FAST_SANITIZE={value!r}: thread cannot be combined with address or leak")
    if not names:
        return []
    return [f"-fsanitize={','.join(names)}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]


def _cuda_choice(value: str) -> str:
    """DITO_FAST_USE_CUDA -> "auto", "on" or "off" (case-insensitive); anything else is an error."""
    v = value.strip().lower()
    for choice, spellings in (("auto", ("auto", "")), ("on", ("1", "on", "true", "yes")),
                              ("off", ("0", "off", "false", "no"))):
        if v in spellings:
            return choice
    raise ValueError(f"DITO_FAST_USE_CUDA={value!r}: expected auto, 1/on/true/yes or 0/off/false/no")


# CUDA architectures built when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible (A100, H100/H200,
# and PTX for newer GPUs to compile at load time).
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"

# CPU kernel units (csrc/ops/*/*_cpu_kernel.cpp) are compiled once per instruction set into
# namespaces of that name; the extension picks one at run time (csrc/include/dito_fast/cpu_kernels.h).
X86_CAPABILITIES = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX512"],
}


def cpu_capabilities():
    if platform.machine().lower() in ("x86_64", "amd64"):
        return X86_CAPABILITIES
    return {"DEFAULT": []}


def is_kernel_unit(path: str) -> bool:
    return path.endswith("_cpu_kernel.cpp")


def _build_record():
    """dito_fast/_build_record.py, loaded by path (importing the package would import torch)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_dito_fast_build_record",
                                                  os.path.join(HERE, "dito_fast", "_build_record.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _refusing_build(message: str):
    """([a placeholder extension], cmdclass) whose build_ext fails with ``message``: the wheel and
    install commands build extensions, sdist and egg_info do not (an sdist needs no torch)."""

    class RefusingBuildExt(build_ext):
        def run(self):
            raise RuntimeError(f"[dito_fast setup] {message}")

    return [Extension("dito_fast._C", sources=[])], {"build_ext": RefusingBuildExt}


def extension_modules():
    cpp = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cu = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    if not cpp:
        _say("no C++ sources in csrc/: building the pure-Python package (ops use the 'ref' backend)")
        return [], {}
    if os.environ.get("DITO_FAST_PURE_PYTHON", "").strip().lower() in ("1", "on", "true", "yes"):
        _say("DITO_FAST_PURE_PYTHON is set: building the pure-Python package without dito_fast._C")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return _refusing_build(
            "torch is not importable at build time, so dito_fast._C (the C++ kernels) cannot be built. Install "
            "torch first, then: pip install --no-build-isolation . (pip's default isolated build environment has "
            "no torch); or set DITO_FAST_PURE_PYTHON=1 for the package without its C++ kernels")
    release = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2] if p.isdigit())
    if release < MIN_TORCH:
        return _refusing_build(
            f"torch {torch.__version__} is older than {'.'.join(map(str, MIN_TORCH))}, the oldest torch dito_fast._C "
            "is built and tested against; upgrade torch, or set DITO_FAST_PURE_PYTHON=1 for the package without "
            "its C++ kernels")
    # one compiler per core this process may use (a container's share, not the host's), at most 8:
    # each unit takes ~1-2 GB of memory at -O3 (MAX_JOBS overrides)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("MAX_JOBS", str(max(1, min(8, cores))))
    want = _cuda_choice(os.environ.get("DITO_FAST_USE_CUDA", "auto"))
    use_cuda = False
    if want != "off":
        home = cpp_extension.CUDA_HOME
        if torch.version.cuda is None:
            _say("CUDA kernels skipped: this torch build has no CUDA")
        elif home is None:
            _say("CUDA kernels skipped: nvcc / CUDA_HOME not found")
        elif not os.path.isfile(os.path.join(home, "bin", "nvcc")):
            # torch takes the folder above any `nvcc` on PATH (or /usr/local/cuda) without looking
            # for the compiler there: a wrapper script or a runtime-only image would fail late
            _say(f"CUDA kernels skipped: CUDA_HOME={home} has no bin/nvcc (set CUDA_HOME to a CUDA toolkit)")
        elif not any(os.path.isdir(os.path.join(home, d)) for d in ("lib64", "lib")):
            _say(f"CUDA kernels skipped: CUDA_HOME={home} has no lib64/ (the CUDA runtime to link)")
        else:
            use_cuda = True
            if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
                # torch takes the architectures of the visible GPUs; with none its list is empty
                # (and its build raises IndexError): the architectures scripts/check_cuda.sh checks
                os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
                _say(f"no GPU visible: building CUDA kernels for TORCH_CUDA_ARCH_LIST={DEFAULT_CUDA_ARCHS}")
        if want == "on" and not use_cuda:
            return _refusing_build("DITO_FAST_USE_CUDA asks for CUDA kernels, but they cannot be built (see the "
                                   "message above)")
    else:
        _say("CUDA kernels skipped: DITO_FAST_USE_CUDA=" + os.environ["DITO_FAST_USE_CUDA"])
    kernels = [p for p in cpp if is_kernel_unit(p)]
    cpp = [p for p in cpp if not is_kernel_unit(p)]
    caps = cpu_capabilities()
    opt, san = OPTIMIZE, sanitizer_flags(os.environ.get("DITO_FAST_SANITIZE", ""))
    if san:
        opt = ["-O1", "-g"]  # line numbers in the reports
        _say(f"sanitizer build ({' '.join(san)}): load the sanitizer runtime first (scripts/sanitize_check.sh)")
    cxx = [*opt, "-DNDEBUG", CXX_STD, "-fopenmp", *san] + [f"-DDITO_FAST_HAVE_{c}" for c in caps if c != "DEFAULT"]
    include = [os.path.join(HERE, "csrc", "include")]
    if use_cuda:
        ext = cpp_extension.CUDAExtension(
            "dito_fast._C", cpp + cu, include_dirs=include,
            extra_compile_args={"cxx": cxx + ["-DDITO_FAST_WITH_CUDA"], "nvcc": ["-O3", CXX_STD, "-DDITO_FAST_WITH_CUDA"]},
            extra_link_args=["-fopenmp", *san])
    else:
        ext = cpp_extension.CppExtension("dito_fast._C", cpp, include_dirs=include,
                                         extra_compile_args=cxx, extra_link_args=["-fopenmp", *san])
    ext.dito_kernel_units = kernels
    _say(f"CPU kernels built for: {', '.join(caps)} (chosen at run time)")

    class BuildExt(cpp_extension.BuildExtension):
        """BuildExtension plus the per-capability CPU kernel objects (incremental)."""

        def build_extensions(self):
            for e in self.extensions:
                e.extra_objects = list(e.extra_objects or []) + self._kernel_objects(getattr(e, "dito_kernel_units", []))
            # what dito_fast.ops._cpp checks on load: the torch built against, the sources built from
            record_lib = _build_record()
            csrc = os.path.join(HERE, "csrc")
            # (the flags too: switching DITO_FAST_SANITIZE on or off in a built tree had kept the
            # old library, the sources being older than it)
            info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda if use_cuda else None,
                    "sources_digest": record_lib.sources_digest(csrc), "source_dir": csrc,
                    "cxx_flags": cxx}
            record = self._build_info()[0]
            try:
                with open(record) as f:
                    previous = json.load(f)
            except (OSError, ValueError):
                previous = None
            if previous != info:  # another torch or other sources than the extension there was built
                self.force = True  # with: relink it (without ninja, setuptools compares the .so's times only)
            super().build_extensions()
            with open(record, "w") as f:
                json.dump(info, f)

        def _build_info(self):
            """(the build record in the build folder, its place beside the in-place extension)."""
            inplace_ext, built_ext = self._get_inplace_equivalent(self.get_finalized_command("build_py"),
                                                                  self.extensions[0])
            name = _build_record().RECORD_NAME
            return os.path.join(os.path.dirname(built_ext), name), os.path.join(os.path.dirname(inplace_ext), name)

        # the record travels with the extension: into wheels, editable installs and in-place builds
        def get_outputs(self):
            return super().get_outputs() + [self._build_info()[0]]

        def copy_extensions_to_source(self):
            super().copy_extensions_to_source()
            self.copy_file(*self._build_info(), level=self.verbose)

        def _get_output_mapping(self):
            yield from super()._get_output_mapping()
            if self.inplace:
                yield self._build_info()

        def _kernel_objects(self, units):
            cxx_bin = os.environ.get("CXX", "c++")
            abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
            incs = [f"-I{p}" for p in include + cpp_extension.include_paths()]
            headers = glob.glob(os.path.join(HERE, "csrc", "include", "**", "*.h"), recursive=True)
            newest_header = max((os.path.getmtime(h) for h in headers), default=0)
            try:
                compiler = subprocess.run([cxx_bin, "--version"], capture_output=True, text=True).stdout
            except OSError:
                compiler = ""
            jobs = []
            for cap, flags in caps.items():
                for src in units:
                    name = os.path.splitext(os.path.basename(src))[0]
                    cmd = [cxx_bin, "-fPIC", *opt, "-DNDEBUG", CXX_STD, "-fopenmp", *san,
                           f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-DCPU_CAPABILITY={cap}", *flags, *incs, "-c", src]
                    # objects of another torch, compiler or command line go to another folder (only
                    # the sources' and headers' times had been compared: a torch upgrade linked
                    # objects built against the old headers)
                    key = hashlib.sha256("\0".join(cmd + [torch.__version__, compiler]).encode()).hexdigest()[:12]
                    obj = os.path.join(self.build_temp, "dito_cpu_kernels", key, cap, name + ".o")
                    cmd += ["-o", obj]
                    stale = (not os.path.exists(obj) or os.path.getmtime(obj) < max(os.path.getmtime(src), newest_header))
                    jobs.append((obj, cmd, stale))

            def run(job):
                obj, cmd, stale = job
                if stale:
                    os.makedirs(os.path.dirname(obj), exist_ok=True)
                    _say("compiling " + os.path.relpath(obj, self.build_temp))
                    subprocess.check_call(cmd)
                return obj

            with ThreadPoolExecutor(max_workers=int(os.environ["MAX_JOBS"])) as pool:
                return list(pool.map(run, jobs))

    return [ext], {"build_ext": BuildExt.with_options(use_ninja=True)}


def _read(path: str) -> str:
    with open(os.path.join(HERE, path), encoding="utf-8") as f:
        return f.read()


def _version() -> str:
    """dito_fast.__version__, read from the package's __init__.py (one place for the version)."""
    for line in _read(os.path.join("dito_fast", "__init__.py")).splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    raise RuntimeError("dito_fast/__init__.py has no __version__")


ext_modules, cmdclass = extension_modules()

setup(
    name="dito_fast",
    version=_version(),
    description="Fast DiTo diffusion-autoencoder image tokenizers (training, encoding, decoding)",
    long_description=_read("README.md") if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dito_fast", "dito_fast.*"]),
    install_requires=[f"torch>={'.'.join(map(str, MIN_TORCH))}", "numpy", "pillow", "safetensors", "tqdm"],
    extras_require={
        # triton: the Triton kernels' tests run in its CPU interpreter (3.7.1 is what torch 2.13's CUDA builds pin,
        # and what a fresh install picks; 3.6, torch 2.11's, runs the kernels on GPUs but not those tests).
        # nvidia-dali-cuda130: the DALI loader's tests (its CPU-only pipelines run without a GPU).
        "test": ["pytest", "pytest-benchmark", "scikit-image",
                 "triton>=3.6,<3.8; platform_system == 'Linux' and platform_machine == 'x86_64'",
                 "nvidia-dali-cuda130; platform_system == 'Linux' and platform_machine == 'x86_64'"],
        "demo": ["scikit-image", "matplotlib"],
        "tensorboard": ["tensorboard"],
    },
    entry_points={"console_scripts": ["dito-fast=dito_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
