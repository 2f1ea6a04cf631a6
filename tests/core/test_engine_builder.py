"""Start-up hands the config's quantization method to the backend's linear-method hook."""
from __future__ import annotations

import pytest

from tgserve.core.config import ConfigError

from .engine_harness import running_engine


def test_quantize_reaches_the_linear_method_hook_and_unavailable_methods_fail_start_up(demo_model_dir):
    """Neither the cpu backend nor the core offers "gptq" yet (issue 12), so both hooks answer None."""
    with pytest.raises(ConfigError, match="`--quantize gptq` is not available"):
        with running_engine(demo_model_dir, quantize="gptq"):
            pass
