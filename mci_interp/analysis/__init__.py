"""Convergence verdicts and the fluency-vs-internalisation (T2/T5) report."""
