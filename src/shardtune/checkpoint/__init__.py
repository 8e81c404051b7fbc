"""Checkpoints: the directory format (store.py), the manager that saves and restores a run (manager.py), the
resume policy (resume.py), and what leaves a run: the PEFT adapter (export.py) and a merged model (merge.py)."""
