"""Scripts that screened the demo model's recipe (docs/demo_model.md); run each with `python -m`."""
