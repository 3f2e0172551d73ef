"""PEFT LoRA folders -> the per-slot A/Bᵀ that models.lora.LoRALinear holds: strict checks of names and shapes,
scale folded into Bᵀ."""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from models.lora import LORA_PROJECTIONS, LoRATarget

_KEY = re.compile(r"base_model\.model\.(?P<parent>.+)\.(?P<proj>[a-z_]+)\.lora_(?P<ab>[AB])\.weight")


class LoRAFormatError(ValueError):
    pass


def max_rank(config: dict) -> int:
    """The largest rank of an adapter's modules: r, or one that rank_pattern gives (what its slot must hold)."""
    return max([config["r"], *(config.get("rank_pattern") or {}).values()])


def rank_and_scale(config: dict, module: str) -> tuple[int, float]:
    """The rank of one module's LoRA (`module`: its name in the model, model.layers.0.self_attn.q_proj) and its scale:
    r and lora_alpha, unless a key of rank_pattern / alpha_pattern names the module (PEFT's rule: the first key
    that matches the end of its name)."""
    def chosen(pattern: dict | None, default: float) -> float:
        return next((v for k, v in (pattern or {}).items() if re.fullmatch(rf"(.*\.)?({k})", module)), default)

    r = chosen(config.get("rank_pattern"), config["r"])
    alpha = chosen(config.get("alpha_pattern"), config["lora_alpha"])
    return r, alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def read_lora(weights_file: Path, config: dict, model: nn.Module,
              targets: dict[str, LoRATarget]) -> dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]]:
    """PEFT LoRA tensors, checked -> module path -> [(shard, A, Bᵀ·scale)], as LoRALinear.write_slot takes them."""
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    with safe_open(weights_file, framework="pt", device="cpu") as f:
        for key in f.keys():
            m = _KEY.fullmatch(key)
            if m is None or m["proj"] not in LORA_PROJECTIONS:
                raise LoRAFormatError(f"unexpected tensor {key!r}: gorgon applies LoRA to the "
                                      f"{'/'.join(LORA_PROJECTIONS)} projections only")
            path = f"{m['parent']}.{model.packed_modules.get(m['proj'], m['proj'])}"
            if path not in targets:
                raise LoRAFormatError(f"tensor {key!r} names a module that this model does not have")
            pairs.setdefault((path, m["proj"]), {})[m["ab"]] = f.get_tensor(key)
    if not pairs:
        raise LoRAFormatError("the adapter has no LoRA tensors")
    staged: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    for (path, proj), ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise LoRAFormatError(f"{path} ({proj}) has lora_{next(iter(ab))} but not its partner")
        target = targets[path]
        size = target.shards[proj][1]
        r, scale = rank_and_scale(config, f"{path.rpartition('.')[0]}.{proj}")
        a, b = ab["A"], ab["B"]
        if a.shape != (r, target.in_features) or b.shape != (size, r):
            raise LoRAFormatError(f"{proj} of {path}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit; "
                                  f"expected ({r}, {target.in_features}) and ({size}, {r})")
        staged.setdefault(path, []).append((list(target.shards).index(proj), a, b.float().T * scale))
    return staged
