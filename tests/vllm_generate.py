"""Greedy generation with vLLM from an NWC folder (run in vLLM's own environment by tests/test_vllm.py).

    python tests/vllm_generate.py NWC_FOLDER TOKENS PROMPT_IDS_JSON  ->  prints NWC-RESULT {"tokens": [[...], ...]}

The plugin is found through its ``vllm.general_plugins`` entry point (nwcfmt installed in the same environment).
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    folder, tokens, prompts = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=folder,
        load_format="nwc",
        dtype="float32",
        enforce_eager=True,
        max_model_len=256,
        seed=0,
        gpu_memory_utilization=0.2,  # on the CPU backend: the share of RAM vLLM may take (a 24 GB machine)
    )
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    print("NWC-RESULT " + json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outputs]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
