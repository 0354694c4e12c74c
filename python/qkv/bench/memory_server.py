"""Entry point of the peak-memory server: ``python -m qkv.bench.memory_server`` (see memory.py)."""
from qkv.bench.memory import serve

if __name__ == "__main__":
    serve()
