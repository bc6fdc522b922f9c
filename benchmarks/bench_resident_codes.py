"""What keeping a quantized document's codes resident costs per token, against dequantizing on load.

    python benchmarks/bench_resident_codes.py LIB.zarr --doc json-module --tokens 32 --repeats 5

Loads the document twice (``resident="float"``: dequantized on load, today's default; ``resident="codes"``:
the stored codes, a head dequantized when it attends), checks that both give the same answer, and times,
interleaved, the question's forward pass (TTFT) and greedy decoding; reports resident KV bytes of each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment  # noqa: E402

QUESTION = "Which externally maintained library is the json module derived from?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("library")
    ap.add_argument("--doc", default=None)
    ap.add_argument("--question", default=QUESTION)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import kvforge
    from kvforge.model import load_model

    lm = load_model(None)
    docs = {mode: kvforge.load(args.library, model=lm, doc=args.doc, resident=mode) for mode in ("float", "codes")}
    answers = {mode: d.answer_ids(args.question, args.tokens) for mode, d in docs.items()}
    assert answers["float"] == answers["codes"], "resident codes changed the answer"
    q = docs["float"].question_ids(args.question)
    ttft = {m: [] for m in docs}
    per_token = {m: [] for m in docs}
    for _ in range(args.repeats):  # interleaved: machine noise hits both alike
        for mode, d in docs.items():
            ttft[mode].append(d.decoder.start(d.document, q, 1).ttft_s)
            r = d.run(args.question, args.tokens)
            per_token[mode].append(r.stats.decode_s / max(1, r.stats.new_tokens - 1))
    result = {"env": environment(lm), "library": args.library, "doc": docs["float"].manifest["document"]["id"],
              "quantization": docs["float"].manifest["storage"]["quantization"],
              "logical_tokens": docs["float"].logical_length, "new_tokens": len(answers["float"])}
    for mode, d in docs.items():
        result[mode] = {"resident_kv_bytes": d.resident_kv_bytes(), "ttft_ms": 1000 * statistics.median(ttft[mode]),
                        "ms_per_token": 1000 * statistics.median(per_token[mode])}
    result["artifact_bytes"] = docs["float"].artifact.file_bytes
    result["codes_extra_ms_per_token"] = result["codes"]["ms_per_token"] - result["float"]["ms_per_token"]
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
