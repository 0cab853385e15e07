"""bplab jobs: suite files, case model and validation, planner, driver, CLI and the run directory."""
