"""The toy world: furniture-like voxel objects whose backs the condition cannot see, and its own small TRELLIS.

It lets the whole DSO loop run on a CPU with no downloads (the README's main job):
  objects    the world: families, static stability, train / held-out splits, offline datasets
  codec      occupancy <-> the stage-1 latent (8, 16, 16, 16), exact; also the decoder of online runs
  condition  the front depth view as condition tokens (DINOv2's stand-in)
  metrics    faithfulness to the conditioning object (IoU, front IoU) and the static check per generation
  render     voxel renders and the figures made of them
  pool       the online trainer's training conditions
  heldout    the held-out protocol used by pretraining, ``scripts/eval_toy.py`` and the main job
  pretrain   pre-training of the toy flow model shipped in ``ported_weights/toy``
Public beyond the trainers: ``objects.sample_params`` and ``objects.stable_variant`` (one object, and its
family's statically stable completion of the same condition: the world's guarantee that DRO has somewhere
to go), ``objects.make_dataset`` (``scripts/make_toy_dataset.py``).
"""
