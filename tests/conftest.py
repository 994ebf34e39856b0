import os

# Eight simulated CPU devices, so sharding tests can build 1x8, 2x4 and 8x1 meshes;
# unsharded tests run on device 0 as usual. Must be set before JAX initializes.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import hypothesis  # noqa: E402

hypothesis.settings.register_profile("default", max_examples=25, deadline=None, derandomize=True)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
