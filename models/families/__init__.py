"""Pipeline families: one module per diffusers pipeline family, looked up by ``models.registry``."""
