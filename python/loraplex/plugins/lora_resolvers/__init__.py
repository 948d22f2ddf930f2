"""vLLM's two LoRA resolvers: folders in a local directory, and subfolders of listed hub repos."""
