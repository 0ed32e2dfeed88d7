"""alpa-plan's executor: reads a plan (and the model) and runs it on CPU ranks or GPUs."""
