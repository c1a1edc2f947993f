"""cryopose: orientation estimation with uncertainty for cryo-EM and cryo-ET particles.

Layers (a lower layer never imports a higher one)::

    so3  ->  io, imaging  ->  bayes, learn, recover  ->  reconstruct, evaluate  ->  cli

Rotation conventions are documented once in ``docs/conventions.md``.
"""

__version__ = "0.1.0"
