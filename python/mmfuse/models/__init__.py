"""Models written as plain `nn.Module`s on `mmfuse.ops`. A model never branches on backend or on
parallel state; each family folder keeps its typed config (`config.py`), modules (`model.py` and
friends), Hugging Face state-dict names (`hf_adapter.py`) and, later, its parallel plan."""
