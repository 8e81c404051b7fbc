"""Planning before any GPU is touched: the memory and time a configuration needs (estimate.py), and the settings
left to `auto` chosen from it (auto.py)."""
