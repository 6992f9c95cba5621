"""Data for lors experiments: sentence bank, synthetic speech, manifests, audio and corpus loaders."""
