"""Online DiffusionNFT (loss 'nft', ``dso_jax.online_losses``): DSO's online loop with a forward-process objective
anchored to an old policy and the frozen base. Online mode only; ``:toy`` is the main job (README)."""

from configs import common


def apply_toy(c):
    """The main job: ``common.apply_toy`` with NFT's own toy settings."""
    common.apply_toy(c)
    # The anchor to the frozen base, strong enough to bind within the run: at DiffusionNFT's 1e-4 it is inert
    # here (mean ||v - v_base||^2 ~ 2e-4 after 16 steps against a policy term ~ 2; bench/RESULTS.md, issue 15).
    c.nft.kl_weight = 30.0
    c.eval.every = 16  # the held-out stable rate over steps, drawn into stable_rate.png
    return c


def get_config(arg=None):
    c = common.get_config()
    c.loss = "nft"
    return common.apply_variants(c, arg, {"tiny": common.apply_tiny, "toy": apply_toy})
