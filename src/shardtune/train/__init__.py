"""A training run: the Run and its steps (run.py, build.py), the state it checkpoints (state.py), one optimizer
step of the objective (step.py), the decision at a step boundary (boundary.py), stopping on a signal
(stopping.py), status.json (status.py), samples and the summary (report.py, generate.py), profiling."""
