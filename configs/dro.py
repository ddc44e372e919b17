"""DSO's DRO run (``configs/dro.yaml``): 4000 steps, loss mean(L_win - L_lose). ``:tiny`` for CPU tests."""

from configs import common


def get_config(arg=None):
    c = common.get_config()
    c.loss = "dro"
    c.train.steps = 4000
    return common.finalize(c, arg)
