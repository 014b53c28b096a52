"""m2m_ray: many-to-many image generation (M2M) and its MIS dataset, on Ray."""

__version__ = "0.1.0"
