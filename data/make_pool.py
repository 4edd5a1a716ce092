#!/usr/bin/env python3
"""Rebuild pool/dsr_sub.jsonl and pool/pi1.jsonl from One-shot RLVR's parquet files.

usage: python3 make_pool.py DSR_SUB.parquet PI1_R128.parquet   (needs pyarrow)

Each parquet row {data_source, prompt: [chat messages], reward_model: {ground_truth}, ...} becomes
one JSON line {id, prompt, answer, data_source}; ids are `dsr-<row>` in the file's order, and the
one distinct row of pi1_r128.parquet is written once with id `pi1`.
"""
import json
import os
import sys

import pyarrow.parquet as pq


def record(rid, row):
    return {
        "id": rid,
        "prompt": [{"content": m["content"], "role": m["role"]} for m in row["prompt"]],
        "answer": row["reward_model"]["ground_truth"],
        "data_source": row["data_source"],
    }


def write(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main():
    dsr, pi1 = sys.argv[1:3]
    here = os.path.dirname(os.path.abspath(__file__))
    rows = pq.read_table(dsr).to_pylist()
    write(os.path.join(here, "pool/dsr_sub.jsonl"), [record(f"dsr-{i}", r) for i, r in enumerate(rows)])
    copies = pq.read_table(pi1).to_pylist()
    assert all(c["prompt"] == copies[0]["prompt"] for c in copies), "pi1 rows differ"
    write(os.path.join(here, "pool/pi1.jsonl"), [record("pi1", copies[0])])


if __name__ == "__main__":
    main()
