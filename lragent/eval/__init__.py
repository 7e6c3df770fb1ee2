"""Accuracy evaluation of the agent pipeline (HotpotQA EM/F1, ScienceQA option accuracy) across sharing schemes."""
