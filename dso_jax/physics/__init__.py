"""Physics: does a generated object stay upright under gravity? (DSO's reward, batched on the accelerator.)

Modules: body (occupancy/mesh -> mass properties + contact proxy), rollout (batched MJX simulation,
`make_stability_fn`, `default_sim_config`), reference (plain-MuJoCo CPU implementation of DSO's protocol),
metrics (rotation angle, Chamfer/F-score), mesh_io (loading with one-line errors).
Submodules are imported explicitly (`from dso_jax.physics import rollout`) so that importing the package
stays cheap and does not pull in MuJoCo.
"""
