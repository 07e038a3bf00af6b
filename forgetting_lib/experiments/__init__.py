"""Many runs and their drivers: `sweep_spec` and `sweep` (grids of runs, resumable), `notebooks`
(papermill runner), `quickstart` (the walkthrough on the built-in sample), `explorer` (the widget
panel)."""
