"""Models: catalog and specs, pipeline families, loading, generation, media, tiny checkpoints.

Torch-free (the API imports these): :mod:`models.spec`, :mod:`models.catalog`, :mod:`models.sources`
(availability and weight resolution), :mod:`models.registry`. Torch side: :mod:`models.loading`,
:mod:`models.families`, :mod:`models.generator`, :mod:`models.adapters`, :mod:`models.tiny`.
:mod:`models.media` needs only Pillow, numpy and imageio-ffmpeg. Nothing here imports ``api`` or
``serve``.
"""
