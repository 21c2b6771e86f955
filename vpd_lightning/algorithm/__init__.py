"""The method itself, free of Lightning: what each method is, the M-step and E-step, the objectives."""
