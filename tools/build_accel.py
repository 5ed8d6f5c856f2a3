#!/usr/bin/env python3
"""Builds picolm's optional C accelerator (picolm_kernels/picolm_kernels.c).

    python3 tools/build_accel.py              # best flags for this CPU
    python3 tools/build_accel.py --portable   # baseline ISA of the architecture
    python3 tools/build_accel.py --cc aarch64-linux-gnu-gcc   # cross build
    CC=clang python3 tools/build_accel.py --cflags "-g"

The compiler is $CC, else the first of cc, gcc, clang found. The library lands next to the
source as picolm_kernels.<system>-<arch>.<so|dylib|dll> with the SHA-256 of the source
compiled in, so picolm only loads a library that matches the C file beside it.
Also importable: build(quiet=False, portable=False) -> path of the library, or None.
"""

import argparse
import os
import shlex
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import picolm_kernels  # noqa: E402  (after the path is set)

BASE_FLAGS = ["-std=c11", "-O3", "-shared", "-fPIC", "-ffp-contract=off",
              "-fvisibility=hidden", "-fno-math-errno"]
LIBS = ["-lm", "-lpthread"]


def find_compiler(cc=None):
    """The compiler command as a list (from --cc, $CC, cc, gcc or clang), or None."""
    for candidate in (cc, os.environ.get("CC")):
        if candidate:
            words = shlex.split(candidate)
            if words and shutil.which(words[0]):
                return words
            if words:
                return None if cc else _first_found()
    return _first_found()


def _first_found():
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return [name]
    return None


def target_of(cc):
    """(system, arch) the compiler builds for, from `cc -dumpmachine`."""
    try:
        out = subprocess.run(cc + ["-dumpmachine"], capture_output=True, text=True,
                             timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    if not out:
        return picolm_kernels.host_system(), picolm_kernels.host_arch()
    return picolm_kernels.normalize_system(out), picolm_kernels.normalize_arch(out)


def isa_flags(arch, native, portable):
    """(flags, isa it should yield) for the target architecture."""
    if arch == "x86_64":
        if native and not portable:
            flags = picolm_kernels.cpu_flags() or set()
            if {"avx2", "fma", "f16c"} <= flags:
                return ["-mavx2", "-mfma", "-mf16c"], "avx2"
        return [], "sse2"
    if arch == "x86":
        return [], "scalar"
    if arch == "aarch64":
        return [], "neon"
    if arch == "arm":
        if portable:
            return [], "scalar"
        return ["-mfpu=neon"], "neon"
    if arch == "riscv64":
        return ["-march=rv64gc"], "scalar"
    return [], "scalar"


def compiler_version(cc):
    try:
        out = subprocess.run(cc + ["--version"], capture_output=True, text=True,
                             timeout=30).stdout
        return out.splitlines()[0].strip() if out else cc[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return cc[0]


def build(quiet=False, portable=False, cc=None, cflags=None, output=None):
    """Compiles the library; returns its path, or None (with one line on stderr)."""
    def say(message, stream=sys.stdout):
        if not quiet or stream is sys.stderr:
            print(message, file=stream, flush=True)

    compiler = find_compiler(cc)
    if compiler is None:
        say("build_accel: no C compiler found (set $CC or install cc, gcc or clang)",
            sys.stderr)
        return None
    system, arch = target_of(compiler)
    native = (arch == picolm_kernels.host_arch() and system == picolm_kernels.host_system())
    extra, isa = isa_flags(arch, native, portable)
    user = shlex.split(cflags) if cflags else []
    if system == "darwin":
        base = [f for f in BASE_FLAGS if f != "-shared"] + ["-dynamiclib"]
    else:
        base = list(BASE_FLAGS)
    source = picolm_kernels.SOURCE
    digest = picolm_kernels.source_hash(source)
    out = output or picolm_kernels.library_path(system, arch)
    tmp = "%s.tmp%d" % (out, os.getpid())
    command = (compiler + base + extra + user + ['-DPK_SOURCE_HASH="%s"' % digest,
                                                 "-o", tmp, source] + LIBS)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
        say("build_accel: %s failed to run: %s" % (compiler[0], e), sys.stderr)
        return None
    if result.returncode != 0 and extra and not portable:
        # the compiler may not know the ISA flags: one more try with the baseline
        first = (result.stderr.strip().splitlines() or ["?"])[0]
        say("build_accel: %s build failed (%s); trying the portable build" % (isa, first))
        return build(quiet=quiet, portable=True, cc=cc, cflags=cflags, output=output)
    if result.returncode != 0:
        lines = [l for l in result.stderr.strip().splitlines() if "error" in l] or \
            result.stderr.strip().splitlines() or ["exit status %d" % result.returncode]
        say("build_accel: compiling failed: %s" % lines[0], sys.stderr)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return None
    os.replace(tmp, out)
    picolm_kernels.forget()
    say("build_accel: built %s (isa %s, %s-%s, %s)" % (out, isa, system, arch,
                                                      compiler_version(compiler)))
    say("build_accel: %s" % " ".join(shlex.quote(w) for w in command).replace(tmp, out))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--portable", action="store_true",
                        help="baseline ISA of the architecture (no AVX2 on x86-64)")
    parser.add_argument("--cc", help="compiler command (default: $CC, cc, gcc, clang)")
    parser.add_argument("--cflags", help="extra compiler flags, e.g. for a cross build")
    parser.add_argument("-o", "--output", help="library path (default: next to the source)")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    path = build(quiet=args.quiet, portable=args.portable, cc=args.cc, cflags=args.cflags,
                 output=args.output)
    return 0 if path else 1


if __name__ == "__main__":
    sys.exit(main())
