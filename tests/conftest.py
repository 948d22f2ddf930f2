from hypothesis import settings

# This machine is shared and noisy: no test may depend on timing.
settings.register_profile("loraplex", deadline=None, max_examples=200)
settings.load_profile("loraplex")
