"""The loss-mask convention of every batch, and the reference next-token loss that follows it.

Convention (unshifted mask): `loss_mask[b, t] = 1` means token `input_ids[b, t]` is a target,
predicted from the logits at position t-1 of the same row. So the mask lies on the *targets*
(assistant content and its end-of-turn token), `loss_mask[:, 0] = 0`, and the first token of
every packed segment has mask 0: no token is ever predicted across a sample boundary. The
trainer computes `nll[t] = -log softmax(logits[t-1])[ids[t]]` and averages it over mask = 1.
The loss functions themselves are in `mllm_tune/losses/token.py`.
"""
from mllm_tune.losses.token import mean_token_loss, next_token_nll, segment_losses  # noqa: F401
