"""Fetch the vllm-ascend and vLLM sources that tests/test_vllm_ascend_loader.py runs, into a peer directory.

    python tools/fetch_vllm_ascend.py [DEST]        # DEST: $GMMQUANT_PEER_DIR, else ~/.cache/gmmquant/peer

Downloads the two sdists from the package index with pip (vllm-ascend==0.23.0.post1 and the vLLM release it
is built for, 0.23.0), checks their sha256, and extracts only the Python sources the loader test executes:
the `vllm_ascend/` package of vllm-ascend and `vllm/model_executor/layers/fused_moe/layer.py` of vLLM. Nothing
is installed into the calling environment: pip's metadata step (which both sdists need before pip will save
them) runs in a throwaway virtualenv that sees the system site-packages (vLLM's setup.py imports torch).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import venv
from pathlib import Path

SDISTS = {
    # name: (requirement or URL, file name, sha256, environment for pip's metadata step)
    "vllm-ascend": ("vllm-ascend==0.23.0.post1", "vllm_ascend-0.23.0.post1.tar.gz",
                    "a3b9f4a5dd7aa50c37e03d1f35937c4ae5aeacc49b734cac74d59ce5757738e1", {"SOC_VERSION": "ascend910b1"}),
    # vLLM's metadata step with VLLM_TARGET_DEVICE=empty reports "0.23.0+empty", which pip refuses as
    # inconsistent with the release's file name; VLLM_VERSION_OVERRIDE makes it report the release's version.
    "vllm": ("vllm==0.23.0", "vllm-0.23.0.tar.gz", "760269db3d9611e12e524681df1bca0977d5d2f5fcb4481cc34d33efc4ae7ff5",
             {"VLLM_TARGET_DEVICE": "empty", "VLLM_VERSION_OVERRIDE": "0.23.0"}),
}
# What the test reads from each sdist (path prefixes inside the archive's top directory).
KEEP = {"vllm-ascend": ("vllm_ascend/",), "vllm": ("vllm/model_executor/layers/fused_moe/layer.py",)}
BUILD_TOOLS = ["setuptools>=77", "setuptools_scm", "setuptools_rust", "packaging", "jinja2", "wheel"]


def default_dest() -> Path:
    return Path(os.environ.get("GMMQUANT_PEER_DIR") or Path.home() / ".cache" / "gmmquant" / "peer")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(dest: Path) -> None:
    missing = [k for k, (_, file, digest, _) in SDISTS.items() if not (dest / file).is_file() or sha256(dest / file) != digest]
    if not missing:
        return
    with tempfile.TemporaryDirectory() as tmp:
        env_dir = Path(tmp) / "venv"
        venv.create(env_dir, with_pip=True, system_site_packages=True)
        py = str(env_dir / "bin" / "python")
        subprocess.run([py, "-m", "pip", "install", "-q", *BUILD_TOOLS], check=True)
        for name in missing:
            spec, file, digest, extra_env = SDISTS[name]
            subprocess.run([py, "-m", "pip", "download", spec, "--no-deps", "--no-binary", ":all:", "--no-build-isolation", "-d", str(dest)],
                           check=True, env={**os.environ, **extra_env})
            got = sha256(dest / file)
            if got != digest:
                raise SystemExit(f"{dest / file}: sha256 {got}, expected {digest}")


def extract(dest: Path) -> None:
    for name, (_, file, _, _) in SDISTS.items():
        top = file[: -len(".tar.gz")]
        with tarfile.open(dest / file) as tar:
            members = [m for m in tar.getmembers() if m.isfile()
                       and any(m.name.startswith(f"{top}/{p}") for p in KEEP[name]) and m.name.endswith(".py")]
            tar.extractall(dest, members=members, filter="data")
        print(f"{name}: {len(members)} source files under {dest / top}")


def main(argv: list[str]) -> int:
    dest = Path(argv[0]) if argv else default_dest()
    dest.mkdir(parents=True, exist_ok=True)
    download(dest)
    extract(dest)
    print(f"run the loader test with GMMQUANT_PEER_DIR={dest} (the default when unset: {default_dest()})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
