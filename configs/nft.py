"""Online DiffusionNFT (loss 'nft', ``dso_jax.online_losses``): DSO's online loop with a forward-process objective
anchored to an old policy and the frozen base. Online mode only; ``:toy`` is the main job."""

from configs import common


def get_config(arg=None):
    c = common.get_config()
    c.loss = "nft"
    return common.finalize(c, arg)
