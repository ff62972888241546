"""Losses over token distributions, one implementation per formula.

    token.py    per-token log-probs and NLL (the batch convention of data/targets.py), per-segment
                means, the trainer's summed cross-entropy with a fused backward pass
    chunked.py  LM head + cross-entropy chunk by chunk, never holding (B, T, V) logits
    distill.py  tempered log-probs, per-position KL, LwF soft cross-entropy, penalty KL, weights
"""
