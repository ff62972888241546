"""Test-session setup: one torch thread, so PyTorch reference computations do not fight XLA's
thread pool for the 2 cores (oversubscription made HF `generate` calls up to 100x slower)."""
import torch

torch.set_num_threads(1)
