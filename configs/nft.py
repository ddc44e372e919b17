"""Online DiffusionNFT (loss 'nft', ``dso_jax.online_losses``): DSO's online loop with a forward-process objective
anchored to an old policy and the frozen base. Online mode only; ``:toy`` is the main job (README)."""

from configs import common


def apply_toy(c):
    """The main job: ``common.apply_toy`` with NFT's own toy settings (bench/RESULTS.md, issue 15's frontier)."""
    common.apply_toy(c)
    # 12 sampling rounds x 5 updates: the rounds (6 conditions x 8 candidates, sampled and simulated) cost most of
    # the CPU, so each round's candidates feed five updates (NFT's trust region to the old policy bounds them),
    # each on 3 of the 6 conditions, those with both labels first (dynamic sampling: 2-5 of 6 have both; an update
    # on 3 costs half of one on 6). 12 x 4 updates on all 6: 0.906 at IoU 0.7105 in 10 min 43 s (RESULTS).
    c.optim.lr = 1e-3
    c.train.steps = 60
    c.train.log_every = 5
    c.train.ckpt_every = 30
    c.online.updates_per_sample = 5
    c.online.update_conditions = 3
    # The anchor to the frozen base: at DiffusionNFT's 1e-4 it is inert here; 30 binds and stalls the stable
    # rate (0.776 after 48 steps at lr 5e-4); 3 and 10 give the same trajectory at lr 1e-3 (RESULTS).
    c.nft.kl_weight = 3.0
    c.online.sample_rows = 8  # 8 latents per sampler call: the same samples, a fraction of the page faults (RESULTS)
    c.eval.every = 0  # held out before and after only (each evaluation: 192 samples, ~150 s of CPU)
    return c


def get_config(arg=None):
    c = common.get_config()
    c.loss = "nft"
    return common.apply_variants(c, arg, {"tiny": common.apply_tiny, "toy": apply_toy})
