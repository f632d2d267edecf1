"""famtune plugin for the Qwen chat model families."""
