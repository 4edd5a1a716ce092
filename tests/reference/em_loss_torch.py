#!/usr/bin/env python3
"""Reference check of `cargo xtask em-loss` against PyTorch/transformers (not a dependency of the
project; run it by hand where torch and transformers are installed).

usage: cargo xtask em-loss --model DIR --input F.json --grads-out G.safetensors [--dtype f32|f64]
       python3 tests/reference/em_loss_torch.py DIR F.json G.safetensors [float32|float64]

Computes the EM loss of METHOD.md with transformers (entropy of softmax(logits / T) over the full
vocabulary at the positions that predict response tokens, token mean over all sequences), back-
propagates it, and prints one JSON line: the loss and the worst per-tensor relative gradient error
||g_ours - g_torch|| / ||g_torch|| against the gradients `em-loss` wrote.
"""
import json, sys
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

model_dir, input_path, grads_path = sys.argv[1:4]
dtype = getattr(torch, sys.argv[4]) if len(sys.argv) > 4 else torch.float32
model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=dtype)
spec = json.load(open(input_path))
temperature = spec["temperature"]
total, n_tokens = 0.0, 0
for seq in spec["sequences"]:
    prompt, response = seq["prompt_ids"], seq["response_ids"]
    logits = model(torch.tensor([prompt + response])).logits[0]
    z = logits[len(prompt) - 1 : len(prompt) + len(response) - 1] / temperature
    logp = torch.log_softmax(z, -1)
    total = total + (-(logp.exp() * logp).sum())
    n_tokens += len(response)
loss = total / n_tokens
loss.backward()
ours = load_file(grads_path)
errors = []
for name, p in model.named_parameters():
    if p.grad is None or name not in ours:
        continue
    a, b = ours[name].double(), p.grad.double()
    errors.append((((a - b).norm() / b.norm().clamp_min(1e-30)).item(), name))
worst = max(errors)
print(json.dumps({"loss": loss.item(), "n_tokens": n_tokens, "tensors": len(errors),
                  "worst_grad_rel_err": worst[0], "worst_tensor": worst[1]}))
