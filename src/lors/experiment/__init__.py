"""The paper-style experiment: stages, search, report."""
