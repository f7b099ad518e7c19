"""docvlm: fine-tuning recipes that teach vision-language models to answer questions about documents."""

from docvlm.runtime import prefer_passive_cpu_threads

# Before anything imports torch: its OpenMP runtime reads the wait policy once, when it loads.
prefer_passive_cpu_threads()

__version__ = "0.1.0"
