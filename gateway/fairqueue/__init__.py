"""Fair, SLO-aware admission under saturation: per-replica slots, weighted fair queuing, priority classes,
deadline-aware shedding. ``scheduler.py`` holds the algorithm (pure), ``admission.py`` the admission step,
``config.py`` the settings (pydantic only, imported by ``gateway/settings.py``)."""
