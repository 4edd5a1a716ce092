"""One Entropy-Minimization update as the PyTorch reference does it: the baseline of
`cargo xtask bench em-step`.

Loads an HF model directory with transformers (float32 unless --dtype), renders a fixed GSM8K-style
problem with the model's chat template, and builds B sequences of prompt + R response tokens (seeded
random ids, or with --responses generate sampled by `generate` at T 0.5, top-p 0.95, repetition
penalty 1.15, untimed). One update is then:

    forward over the whole batch with full logits;
    entropy of softmax(logits / T) (T = --temperature, 0.5) over the full vocabulary at the logits
    that predict the response tokens (positions P-1 .. P+R-2), mean over all B * R positions;
    backward; clip_grad_norm_(1.0); AdamW (lr 2e-5, torch's default weight decay 0.01); zero_grad.

--warmup updates run untimed, then --steps timed ones. The last stdout line is one JSON object:
median seconds per update (sec_per_step) split into forward (incl. the entropy), backward and
optimizer, peak RSS (ru_maxrss_mb), the shapes, the threads, the entropies and the versions.
Progress goes to stderr.

    python bench/torch_em_step.py --model-dir DIR --threads 2 --batch 8 --resp-len 256 --steps 2
"""

import argparse
import json
import resource
import statistics
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

PROBLEM = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def log(msg):
    print(f"torch_em_step: {msg}", file=sys.stderr, flush=True)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True, help="HF directory (config.json, safetensors, tokenizer)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--batch", type=int, default=8, help="responses B")
    p.add_argument("--resp-len", type=int, default=256, help="tokens R of each response")
    p.add_argument("--steps", type=int, default=2, help="timed updates")
    p.add_argument("--warmup", type=int, default=1, help="untimed updates first")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--responses", default="random", choices=["random", "generate"])
    p.add_argument("--problem", default=PROBLEM)
    p.add_argument("--prompt-ids", help="comma-separated prompt token ids to use instead of rendering "
                   "--problem (bench em-step passes its own, so both sides run the same shapes)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.steps < 1 or args.batch < 1 or args.resp_len < 1:
        p.error("--steps, --batch and --resp-len must be at least 1")
    return args


def prompt_ids(tokenizer, problem):
    messages = [{"role": "user", "content": f"{problem}\n{INSTRUCTION}"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build_batch(model, tokenizer, prompt, args):
    """B rows of prompt + R response ids, as a (B, P + R) tensor."""
    p = torch.tensor([prompt] * args.batch)
    if args.responses == "random":
        g = torch.Generator().manual_seed(args.seed)
        resp = torch.randint(0, model.config.vocab_size, (args.batch, args.resp_len), generator=g)
        return torch.cat([p, resp], dim=1)
    with torch.no_grad():  # untimed; min_new_tokens keeps every response R tokens long
        out = model.generate(
            p, attention_mask=torch.ones_like(p), do_sample=True, temperature=0.5, top_p=0.95,
            repetition_penalty=1.15, max_new_tokens=args.resp_len, min_new_tokens=args.resp_len,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    return out[:, : len(prompt) + args.resp_len]


def em_update(model, optimizer, ids, prompt_len, resp_len, temperature):
    """One update; returns (entropy before it, forward s, backward s, optimizer s)."""
    t0 = time.perf_counter()
    logits = model(input_ids=ids).logits  # (B, P + R, V)
    # The logit at position t predicts token t + 1: responses start at P, so P-1 .. P+R-2.
    resp_logits = logits[:, prompt_len - 1 : prompt_len + resp_len - 1, :].float() / temperature
    logp = torch.log_softmax(resp_logits, dim=-1)
    loss = -(logp.exp() * logp).sum(dim=-1).mean()
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    return loss.item(), t1 - t0, t2 - t1, t3 - t2


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype)
    if args.prompt_ids:
        prompt = [int(t) for t in args.prompt_ids.split(",")]
    else:
        prompt = prompt_ids(tokenizer, args.problem)
    ids = build_batch(model, tokenizer, prompt, args)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    log(
        f"{args.model_dir} {args.dtype}, {args.batch} x ({len(prompt)} + {args.resp_len}) tokens, "
        f"{args.threads} threads, {args.warmup} warm-up + {args.steps} timed updates"
    )

    entropies, fwd, bwd, opt = [], [], [], []
    for step in range(args.warmup + args.steps):
        h, f, b, o = em_update(model, optimizer, ids, len(prompt), args.resp_len, args.temperature)
        timed = step >= args.warmup
        log(f"update {step}{'' if timed else ' (warm-up)'}: entropy {h:.4f}, {f + b + o:.2f} s")
        entropies.append(h)
        if timed:
            fwd.append(f)
            bwd.append(b)
            opt.append(o)

    totals = [f + b + o for f, b, o in zip(fwd, bwd, opt)]
    print(json.dumps({
        "sec_per_step": statistics.median(totals),
        "fwd_s": statistics.median(fwd),
        "bwd_s": statistics.median(bwd),
        "opt_s": statistics.median(opt),
        "step_s": totals,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "prompt_len": len(prompt),
        "resp_len": args.resp_len,
        "batch": args.batch,
        "threads": args.threads,
        "dtype": args.dtype,
        "temperature": args.temperature,
        "responses": args.responses,
        "warmup": args.warmup,
        "steps": args.steps,
        "entropy_first": entropies[0],
        "entropy_last": entropies[-1],
        "entropies": entropies,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }))


if __name__ == "__main__":
    main()
