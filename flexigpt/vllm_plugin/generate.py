"""Greedy generation with vLLM's offline engine: the check behind the plugin's tests and benchmark.

    python -m flexigpt.vllm_plugin.generate MODEL_DIR REQUEST.json RESULT.json

Run with the interpreter of vLLM's environment. REQUEST: ``{"prompts": [[token ids], ...],
"max_tokens": N}`` (optional: ``dtype``, default float32; ``max_model_len``, default 128;
``memory_fraction``, vLLM's ``gpu_memory_utilization``, on the CPU backend the share of RAM it may
reserve; ``repeats``, timed runs after the first, whose median time is reported). RESULT: the generated token ids per prompt, the
process's resident memory before and after the engine was built, and the generation wall time.
The prompts go in as one batch, which vLLM schedules continuously.
"""

from __future__ import annotations

import json
import sys
import time


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    """Serve MODEL_DIR with vLLM's offline engine and write RESULT.json."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model_dir, request_path, result_path = sys.argv[1:4]
    with open(request_path) as f:
        request = json.load(f)
    rss_before = _rss_bytes()
    llm = LLM(
        model=model_dir,
        skip_tokenizer_init=True,
        enforce_eager=True,
        dtype=request.get("dtype", "float32"),
        max_model_len=int(request.get("max_model_len", 128)),
        max_num_seqs=len(request["prompts"]),
        gpu_memory_utilization=float(request.get("memory_fraction", 0.15)),
    )
    rss_engine = _rss_bytes()
    params = SamplingParams(
        max_tokens=request["max_tokens"], temperature=0.0, ignore_eos=True, detokenize=False
    )
    prompts = [TokensPrompt(prompt_token_ids=p) for p in request["prompts"]]
    seconds = []
    for _ in range(1 + int(request.get("repeats", 0))):  # the first run also warms up; later ones are timed
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)  # one batch, scheduled continuously
        seconds.append(time.perf_counter() - start)
    result = {
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "rss_before_engine": rss_before,
        "rss_after_engine": rss_engine,
        "seconds": seconds[-1] if len(seconds) == 1 else sorted(seconds[1:])[(len(seconds) - 1) // 2],
    }
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
