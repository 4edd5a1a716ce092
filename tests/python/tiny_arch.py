"""Tiny random models of several architectures, and their transformers logits / EM-loss gradients.

Used by the Rust architecture tests as the PyTorch/transformers reference. `make` builds a tiny
random model with transformers itself and saves it twice: OUT/v5 as transformers 5 writes it and
OUT/v4 with the same weights and the config.json rewritten in the transformers-4.x layout
(rope_theta / rope_scaling / rope_local_base_freq, torch_dtype). `reference` writes the logits of
one sequence, the EM loss (as tests/reference/em_loss_torch.py computes it) and its gradients to a
safetensors file. Each subcommand prints one JSON line.

usage: tiny_arch.py make --case CASE [CASE ...] --tokenizer DIR --out ROOT [--seed 0]
       tiny_arch.py reference --input F.json --job MODEL[+ADAPTER]=OUT.safetensors [--job ...]

`make` writes ROOT/CASE/v5 and ROOT/CASE/v4 for each case. A `reference` job with +ADAPTER loads
MODEL under that PEFT adapter (as PEFT applies it). Several cases or jobs share one start of
Python (importing torch is most of the time).
"""
import argparse
import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from safetensors.torch import save_file
from transformers import (AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig,
                          Qwen2Config, Qwen3Config)
from transformers.utils import logging

logging.disable_progress_bar()

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)


def rope(theta, **scaling):
    return {"rope_type": scaling.pop("rope_type", "default"), "rope_theta": theta, **scaling}


CASES = {
    "qwen2": (Qwen2Config, dict(rope_parameters=rope(1e6), tie_word_embeddings=False)),
    "llama": (LlamaConfig, dict(rope_parameters=rope(10000.0), tie_word_embeddings=True)),
    "llama3": (LlamaConfig, dict(
        rope_parameters=rope(500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=16),
        tie_word_embeddings=False)),
    "gemma3": (Gemma3TextConfig, dict(
        head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=16, tie_word_embeddings=True,
        rope_parameters={"full_attention": rope(1e6), "sliding_attention": rope(10000.0)})),
    "qwen3-tied": (Qwen3Config, dict(head_dim=32, attention_bias=False, tie_word_embeddings=True,
                                     rope_parameters=rope(1e6), use_sliding_window=False)),
    "qwen3-untied": (Qwen3Config, dict(head_dim=32, attention_bias=False, tie_word_embeddings=False,
                                       rope_parameters=rope(1e6), use_sliding_window=False)),
    "mistral": (MistralConfig, dict(sliding_window=8, rope_parameters=rope(1e6),
                                    tie_word_embeddings=False)),
}


def v4_config(cfg):
    """A transformers-5 config.json dict rewritten in the transformers-4.x layout."""
    out = {}
    for key, value in cfg.items():
        if key == "dtype":
            out["torch_dtype"] = value
        elif key != "rope_parameters":
            out[key] = value
    rp = cfg["rope_parameters"]
    scaling = lambda p: {k: v for k, v in p.items() if k != "rope_theta"}
    if "full_attention" in rp:  # gemma3: one rope per layer type
        full, local = rp["full_attention"], rp["sliding_attention"]
        out["rope_theta"] = full["rope_theta"]
        out["rope_local_base_freq"] = local["rope_theta"]
        out["rope_scaling"] = scaling(full) if full.get("rope_type", "default") != "default" else None
    else:
        out["rope_theta"] = rp["rope_theta"]
        if rp.get("rope_type", "default") != "default":
            out["rope_scaling"] = scaling(rp)
    return out


def make(a, case):
    with open(os.path.join(a.tokenizer, "config.json")) as f:
        tok_cfg = json.load(f)
    config_class, kwargs = CASES[case]
    ids = {k: tok_cfg.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = config_class(vocab_size=tok_cfg["vocab_size"], **TINY, **ids, **kwargs)
    torch.manual_seed(a.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gemma = config.model_type.startswith("gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # gemma stores norm weights as offsets w, applying 1 + w
                p.copy_((0.0 if gemma else 1.0) + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    v5, v4 = os.path.join(a.out, case, "v5"), os.path.join(a.out, case, "v4")
    model.save_pretrained(v5)
    os.makedirs(v4, exist_ok=True)
    for name in ("model.safetensors", "generation_config.json"):
        if os.path.exists(os.path.join(v5, name)):
            shutil.copy(os.path.join(v5, name), v4)
    with open(os.path.join(v5, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(v4, "config.json"), "w") as f:
        json.dump(v4_config(cfg), f, indent=2, sort_keys=True)
        f.write("\n")
    for d in (v5, v4):
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(a.tokenizer, name), d)
    print(json.dumps({"case": case, "v5": v5, "v4": v4, "vocab_size": config.vocab_size,
                      "model_type": config.model_type,
                      "params": sum(p.numel() for p in model.parameters())}))


def reference(input_path, job):
    target, out_path = job.rsplit("=", 1)
    model_dir, _, adapter = target.partition("+")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="eager")
    if adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    model.eval()  # no dropout; gradients still flow
    with open(input_path) as f:
        spec = json.load(f)
    with torch.no_grad():
        logits = model(torch.tensor([spec["logits_ids"]])).logits[0].float().contiguous()
    temperature = spec["temperature"]
    total, n_tokens = 0.0, 0
    for seq in spec["sequences"]:
        prompt, response = seq["prompt_ids"], seq["response_ids"]
        seq_logits = model(torch.tensor([prompt + response])).logits[0]
        z = seq_logits[len(prompt) - 1 : len(prompt) + len(response) - 1] / temperature
        logp = torch.log_softmax(z, -1)
        total = total + (-(logp.exp() * logp).sum())
        n_tokens += len(response)
    loss = total / n_tokens
    loss.backward()
    out = {"logits": logits, "loss": loss.detach().double().reshape(1)}
    for name, p in model.named_parameters():
        if p.grad is not None:
            out["grad." + name] = p.grad.float().contiguous()
    save_file(out, out_path)
    print(json.dumps({"job": job, "loss": loss.item(), "n_tokens": n_tokens,
                      "grads": len(out) - 2}))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--case", required=True, nargs="+", choices=sorted(CASES))
    m.add_argument("--tokenizer", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("reference")
    r.add_argument("--input", required=True)
    r.add_argument("--job", required=True, action="append")
    a = p.parse_args()
    if a.cmd == "make":
        for case in a.case:
            make(a, case)
    else:
        for job in a.job:
            reference(a.input, job)


if __name__ == "__main__":
    main()
