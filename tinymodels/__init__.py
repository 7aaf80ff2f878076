"""The built-in `tiny:*` models: runtime code that builds them in-process, for the smoke
recipes, the tests and the benchmarks. A random-weight Qwen3 student and teacher, also at
Qwen3's real shapes (random_weights.py), and a tiny teacher trained in-process to write
<think> traces (thinker.py). Real recipes never use them.

`shared.models` only resolves names (where `tiny:x` lives on disk); `tinymodels.build.
ensure_model` is the one call that builds on demand, and the builders import `shared`, never
the reverse."""
