"""llava-cli: talk to LLaVA vision-language models on your own machine."""

__version__ = "0.1.0"
