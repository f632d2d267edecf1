"""One adapter method per quantization on every built-in family other than Qwen2.5 (whose full
method matrix is in test_adapters_e2e.py): the methods rotate over the families, so every method
meets a family with packed projections (Baichuan2's W_pack, InternLM2's wqkv, ChatGLM's
query_key_value) and each family trains, resumes, merges and chats with a non-plain method.
"""

from __future__ import annotations

import pytest
import test_adapters_e2e as matrix
from test_adapters_e2e import tiny_models  # noqa: F401  (the fixture)

OTHER_FAMILIES = ["qwen1", "qwen2", "qwen3", "internlm2", "baichuan2-7b", "baichuan2-13b", "chatglm3", "glm4"]
ROTATION = [(family, list(matrix.METHODS)[(i + 1) % len(matrix.METHODS)]) for i, family in enumerate(OTHER_FAMILIES)]


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    yield


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["nf4", "none"])
@pytest.mark.parametrize("family, method", ROTATION)
def test_one_method_per_family_trains_resumes_merges_and_chats(
    tiny_models,
    tmp_path,
    family,
    method,
    quantization,
):
    base = tiny_models(family)
    out = matrix.check_resume(base, tmp_path, quantization, **matrix.METHODS[method])
    matrix.check_merge_and_chat(base, out, family, quantization, tmp_path)
