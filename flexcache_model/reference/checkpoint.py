"""Checkpoint I/O: safetensors weights (fp16 on disk, fp32 in memory) + a JSON config. No pickle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"


def save(module: nn.Module, config: dict[str, Any], directory: Path | str, name: str,
         half: bool = True) -> None:
    """Write name.safetensors and name.json into directory."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.detach().half() if half and v.is_floating_point() else v.detach()).contiguous()
          for k, v in module.state_dict().items()}
    save_file(sd, str(d / f"{name}.safetensors"))
    (d / f"{name}.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_config(directory: Path | str, name: str) -> dict[str, Any]:
    """The JSON config stored beside a checkpoint."""
    p = Path(directory) / f"{name}.json"
    if not p.exists():
        raise FileNotFoundError(f"no checkpoint config {p}; train it with `flexcache-model train`")
    return json.loads(p.read_text())


def load_weights(module: nn.Module, directory: Path | str, name: str) -> nn.Module:
    """Load name.safetensors into module (as fp32) and switch it to eval mode."""
    sd = load_file(str(Path(directory) / f"{name}.safetensors"))
    module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    return module.eval()
