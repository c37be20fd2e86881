"""Shared by the Ray test modules: a local cluster per module, the replicas' engine arguments,
a chat template for the byte-level test tokenizer (it has none)."""

import pytest
import ray

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
# tests pass enforce_eager themselves: replicas run the user's engine arguments unchanged
ENGINE = dict(dtype="float32", max_model_len=512, max_num_batched_tokens=256,
              enable_prefix_caching=False, num_gpu_blocks_override=64, enforce_eager=True)


@pytest.fixture(scope="module")
def cluster():
    """4 logical CPUs on this 2-core machine: each replica binds its threads to one core."""
    ray.init(num_cpus=4, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield
    ray.shutdown()
