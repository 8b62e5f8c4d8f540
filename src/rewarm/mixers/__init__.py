"""Linear-time sequence mixers in pure PyTorch (naive / recurrent / chunkwise forms) and a
Llama-shaped causal LM built from them (`modeling`), registered with transformers on `import rewarm`."""
