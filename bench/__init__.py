"""Speed and memory benchmarks of LoRA training on real-size, random-weight denoisers."""
