"""Build a published, validated neuron dataset from a vision-language model."""

__version__ = "0.1.0"
