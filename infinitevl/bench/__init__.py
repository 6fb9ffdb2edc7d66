"""Benchmarks: InfiniteVL against the Transformer it replaces (transformers' Qwen2.5-VL text model) and against the
machine's own limits, measured in one run, written as JSON, drawn with matplotlib and reported in
`docs/benchmarks.md`.

Sections (each a module with a `run(plan, ...)` that returns a JSON-able dict):
    machine    the machine's description and its measured memory bandwidth and matmul throughput (the limit)
    ops        the chunked gated delta rule, its decode step and sliding-window attention against references
    decode     per-token latency against context length, both models, and achieved / bandwidth floor
    prefill    time and tokens/s for a prompt of N tokens, both models
    memory     peak process memory (a fresh subprocess per point) and state / KV-cache bytes against context
    real       one long context built from real tokens against the filled one decode and memory use (both models)
    streaming  frames per second over a long stream of 448x448 frames, end to end and decoder only
    precision  fp32 / bf16 / int8 / int4 at real size: load, peak memory, decode, prefill, vision; llama.cpp beside
    quality    bf16 / int8 / int4 against fp32 on the bundled trained model and the official fixture
    variants   the paper's v2 variants: Offline's block-sparse prefill against dense full attention on the same
               layer, Online's decode latency and state bytes against context (docs/variants.md)
    stream4b   live frames at real size: the 4b decoder (bf16, int8, int4) with the full tower, 448 and 224, paired
               or not, per part (decode, preprocess, tower, prefill) against each part's matrix products alone
    ray        the server on Ray Serve: sessions' frames/s on 1 vs 2 replicas, a session's move after a kill, the
               proxy's cost per request (not in the quick plan: it starts a Ray cluster)

`runner.py` holds the full and quick plans and runs the sections; `report.py` turns the JSON into plots and
markdown. Nothing here changes the model or the engine: it only drives them.
"""

SECTIONS = (
    "machine",
    "ops",
    "decode",
    "prefill",
    "memory",
    "real",
    "streaming",
    "precision",
    "quality",
    "variants",
    "stream4b",
    "ray",
)
CONFIG_NAMES = ("tiny", "mini", "4b")  # the measured configurations (`configs.py` builds them)
