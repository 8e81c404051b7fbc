"""The model: its architecture and the settings that shape it (modeling.py), the 4-bit base + LoRA built layer by
layer (loading.py), the tokenizer (tokenizer.py), and what the Hugging Face Hub refuses or fails to give (hub.py)."""
