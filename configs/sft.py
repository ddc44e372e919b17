"""DSO's SFT ablation: flow matching on stable samples only; 12 pairs x 1 accumulation, 20k steps."""

from configs import common


def get_config(arg=None):
    c = common.get_config()
    c.loss = "sft"
    c.train.steps = 20000
    c.train.batch_size = 12
    c.train.grad_accum = 1
    return common.finalize(c, arg)
