"""PEFT adapters served per request: LoRA (lora.py), prefix tuning (prefix.py), loaded and unloaded by
name while the engine runs (manager.py); engine/training/adapters.py trains the shipped examples."""
