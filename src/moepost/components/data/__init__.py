"""Data files and datasets, their row formats, chat templates, prompt templates, batching."""
