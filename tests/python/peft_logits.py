"""Logits of an HF base model under a PEFT LoRA adapter, as the PEFT library applies it.

Used by tests/tests/train_lora.rs to check that the adapters `train --adapter lora` writes load in
PEFT (names, shapes, scale) and give the logits llama.cpp gives with the same adapter. Writes the
logits as little-endian f32 rows to --out and prints one JSON line about what PEFT loaded.
"""
import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--tokens", required=True, help="comma-separated token ids")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    model = AutoModelForCausalLM.from_pretrained(a.base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, a.adapter)
    model.eval()
    ids = torch.tensor([[int(t) for t in a.tokens.split(",")]])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    with open(a.out, "wb") as f:
        f.write(logits.numpy().astype("<f4").tobytes())
    adapted = [n for n, m in model.named_modules() if hasattr(m, "lora_B") and "default" in m.lora_B]
    nonzero_b = sum(
        1 for n, m in model.named_modules()
        if hasattr(m, "lora_B") and "default" in m.lora_B and m.lora_B["default"].weight.abs().sum() > 0
    )
    cfg = model.peft_config["default"]
    print(json.dumps({
        "peft": peft.__version__,
        "adapted_modules": len(adapted),
        "nonzero_b": nonzero_b,
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "rows": logits.shape[0],
        "vocab": logits.shape[1],
    }))


if __name__ == "__main__":
    main()
