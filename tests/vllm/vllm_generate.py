"""Greedy generation with vLLM, run with the interpreter of vLLM's environment (see test_vllm_plugin.py).

    python vllm_generate.py MODEL_DIR REQUEST.json RESULT.json

REQUEST: {"prompts": [[token ids], ...], "max_tokens": N}. RESULT: the generated token ids per
prompt, the bytes of the model's parameters as vLLM holds them, and the generation wall time.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    """Serve MODEL_DIR with vLLM's offline engine and write RESULT.json."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model_dir, request_path, result_path = sys.argv[1:4]
    with open(request_path) as f:
        request = json.load(f)
    llm = LLM(
        model=model_dir,
        skip_tokenizer_init=True,
        enforce_eager=True,
        dtype="float32",
        max_model_len=128,
        max_num_seqs=len(request["prompts"]),
        gpu_memory_utilization=float(request.get("memory_fraction", 0.15)),
    )
    # parameters counted once each, as the model holds them (shared blocks once)
    param_bytes = llm.apply_model(lambda m: sum(p.numel() * p.element_size() for p in m.parameters()))[0]
    params = SamplingParams(
        max_tokens=request["max_tokens"], temperature=0.0, ignore_eos=True, detokenize=False
    )
    prompts = [TokensPrompt(prompt_token_ids=p) for p in request["prompts"]]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)  # one batch: vLLM schedules it continuously
    seconds = time.perf_counter() - start
    result = {
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "param_bytes": param_bytes,
        "seconds": seconds,
    }
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
