"""asrd: a streaming speech-recognition gateway on trio, NATS and pluggable engine workers."""

__version__ = "0.1.0"
