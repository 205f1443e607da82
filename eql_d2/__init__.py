"""eql_d2: equalization losses and long-tailed detectors for detectron2.

The package root imports nothing, so `eql_d2.losses` stays usable without detectron2.
Detectron2 users call `eql_d2.config.add_eql_config(cfg)` and import `eql_d2.modeling`
to register the models.
"""

__version__ = "0.1.0"
