"""WiSE-FT (docs/methods.md §6.1, Wortsman et al. 2022), post-hoc: `(1 - alpha) theta0 + alpha
theta_ft`, paper headline alpha = 0.5, swept over {0, 0.1, ..., 1}. `alphas` is an ordered
`(regex, alpha)` list on logical paths (first match wins), e.g.
`(("llm/layers_(2[4-9]|3[01])/.*", 0.8),)` for the last 8 of 32 blocks.
Consumed by `mllm_tune.posthoc.merging.wise_ft(theta0, theta_ft, alpha, alphas)`."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "wise_ft"
  c.alpha = 0.5
  c.alphas = ()
  c.sweep = tuple(i / 10 for i in range(11))  # alphas of the trade-off curve
  return c
