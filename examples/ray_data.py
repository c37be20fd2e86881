"""Ray Data interop: run a dataset through engines with the plugin (an actor pool).

Run: python examples/ray_data.py MODEL_DIR
"""

import sys

import ray

from vllm_prepack.ray_data import map_dataset

if __name__ == "__main__":
    ray.init(num_cpus=2)
    ds = ray.data.from_items([{"prompt_token_ids": [5 + i % 90] * (3 + 7 * i % 200)} for i in range(64)])
    out = map_dataset(ds, sys.argv[1], replicas=2, max_tokens=8,
                      engine_kwargs={"dtype": "float32", "max_model_len": 512})
    print(out.take(2))
