"""`from engine_core import LLM, SamplingParams, RequestOutput` works (as in vLLM / nano-vllm), the
names are the real classes, and a light import (`engine_core.sampling_params`, as the gateway and
services do) does not load the engine through the package's lazy exports."""
from __future__ import annotations

import subprocess
import sys

import engine_core
from engine_core.llm import LLM
from engine_core.outputs import RequestOutput
from engine_core.sampling_params import SamplingParams


def test_top_level_exports_are_the_classes():
    from engine_core import LLM as top_llm
    from engine_core import RequestOutput as top_out
    from engine_core import SamplingParams as top_sp

    assert (top_llm, top_out, top_sp) == (LLM, RequestOutput, SamplingParams)
    assert sorted(engine_core.__all__) == ["LLM", "RequestOutput", "SamplingParams"]
    assert set(engine_core.__all__) <= set(dir(engine_core))


def test_unknown_name_is_an_attribute_error():
    try:
        engine_core.NoSuchThing  # noqa: B018
    except AttributeError as e:
        assert "NoSuchThing" in str(e)
    else:
        raise AssertionError("engine_core.NoSuchThing resolved")


def test_light_import_stays_light():
    code = ("import sys; import engine_core; from engine_core import SamplingParams; "
            "print('engine_core.llm' in sys.modules, 'engine_core.llm_engine' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
