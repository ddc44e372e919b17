"""DSO's DPO run (``configs/dpo.yaml``): 8000 steps, beta 500 (Diffusion-DPO). ``:tiny`` for CPU tests."""

from configs import common


def get_config(arg=None):
    c = common.get_config()
    c.loss = "dpo"
    c.train.steps = 8000
    c.dpo.beta = 500.0
    return common.finalize(c, arg)
