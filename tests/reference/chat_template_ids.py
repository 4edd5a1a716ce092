"""Reference prompts from transformers, for tests/tests/prompt_transformers.rs.

For each model directory and each JSON line of `cargo xtask prompt --json` output (its `messages`),
renders the turns with `tokenizer.apply_chat_template(..., add_generation_prompt=True)` and records
the text and the token ids. Needs only `transformers` (no PyTorch).

    python tests/reference/chat_template_ids.py NAME=DIR:PROMPTS.jsonl [...] > tests/reference/prompts_transformers.json
"""
import json
import sys

from transformers import AutoTokenizer

out = {"transformers": __import__("transformers").__version__, "models": {}}
for arg in sys.argv[1:]:
    name, rest = arg.split("=", 1)
    model_dir, prompts = rest.split(":", 1)
    tok = AutoTokenizer.from_pretrained(model_dir)
    items = []
    for line in open(prompts):
        p = json.loads(line)
        text = tok.apply_chat_template(p["messages"], add_generation_prompt=True, tokenize=False)
        ids = tok.apply_chat_template(p["messages"], add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        items.append({"id": p["id"], "messages": p["messages"], "text": text, "ids": list(ids)})
    out["models"][name] = items
json.dump(out, sys.stdout, indent=1, ensure_ascii=False)
print()
