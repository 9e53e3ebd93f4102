"""Run llama.cpp's convert_hf_to_gguf.py on a dsv4c (official-format) checkpoint, unchanged but for one thing.

    python benchmarks/llama_cpp_convert.py LLAMA_CPP_DIR CHECKPOINT_DIR --outfile model.gguf [converter args...]

The converter identifies a byte-level BPE tokenizer's pre-tokenizer by hashing the ids it gives a fixed test
string (`get_vocab_base_pre`, a table generated from known upstream tokenizers) and refuses any tokenizer not in
that table. The synthetic checkpoints' tokenizer (dsv4c/runtime/tokenizer.py) is a vocabulary learned here, so its
hash is in no table, although its pre-tokenizer is the plain GPT-2 one (`ByteLevel`, `use_regex: true`, no
normalizer), which llama.cpp implements as "gpt-2". This wrapper answers "gpt-2" for exactly that configuration
when the table has no entry, and otherwise leaves the converter (and its error) as it is; no llama.cpp file is
changed. FP8 weights become Q8_0 and FP4 routed experts MXFP4 by the converter's own DeepSeek-V4 rules
(conversion/deepseek.py: DeepseekV4Model.tensor_force_quant / _write_mxfp4_expert_tensor), so no flag is needed.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

GPT2_PRE_TOKENIZER = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    llama_cpp = Path(sys.argv[1]).resolve()
    script = llama_cpp / "convert_hf_to_gguf.py"
    if not script.is_file():
        sys.exit(f"{script} not found: pass the llama.cpp source tree (vendor/llama.cpp of the llama-cpp-python sdist)")
    sys.path[:0] = [str(llama_cpp), str(llama_cpp / "gguf-py")]
    from conversion.base import TextModel

    table = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return table(self, tokenizer)
        except NotImplementedError:
            spec = json.loads((Path(self.dir_model) / "tokenizer.json").read_text(encoding="utf-8"))
            if spec.get("normalizer") is None and spec.get("pre_tokenizer") == GPT2_PRE_TOKENIZER:
                return "gpt-2"
            raise

    TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = [str(script), *sys.argv[2:]]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
