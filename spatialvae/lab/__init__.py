"""The lab: what measures a run rather than makes one.

`evaluate` (reconstructions, samples and their floors, one ``metrics.json``), the X-ray
`features` space and its domain FD, the classifier two-sample test (`c2st`), train-on-synthetic
(`tstr`), the recipe `ablation` and its `variants`, `bench` (speed and time-to-quality), the
image `metrics` and the `report` tables. The core (``spatialvae/*.py``: config, data, model,
losses, trainer, texture stage, prior, samplers, run folders, CLI) imports nothing from here, so
training and sampling need none of it.
"""
