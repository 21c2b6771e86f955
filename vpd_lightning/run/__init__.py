"""Run plumbing only the CLI uses: the checks a run meets before it starts, config files read
within a budget, the preemption save, the per-step log line and the learning curves."""
