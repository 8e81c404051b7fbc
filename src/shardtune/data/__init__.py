"""The rows a run trains on: where they come from (sources.py: local files, hub datasets, the generated task in
tasks.py), their format and completion-only labels (formats.py; preference pairs in preference.py), and the
splits, batches and their order (loader.py)."""
