"""kvforge.options: the one home of build-option values and checks."""

from __future__ import annotations

import pytest

from kvforge import artifact, options, quantize
from kvforge.errors import ConfigError
from kvforge.methods import Budget


def test_storage_names_agree_with_the_artifact_writer():
    assert set(options.STORAGE_DTYPES) == set(artifact.STORAGE_DTYPES)
    assert all(artifact.STORAGE_DTYPES[name].is_floating_point for name in options.STORAGE_DTYPES)
    assert set(quantize.SCHEMES) == set(options.QUANTIZATIONS)  # every quantization has its bits


@pytest.mark.parametrize("keep, want", [("auto", "auto"), (" AUTO ", "auto"), ("0.5", 0.5), (1, 1.0)])
def test_check_keep(keep, want):
    assert options.check_keep(keep) == want


@pytest.mark.parametrize("keep, match", [("most", "a number in"), (0.0, r"in \(0, 1\]"), (1.5, "or 'auto'")])
def test_check_keep_refuses(keep, match):
    with pytest.raises(ConfigError, match=match):
        options.check_keep(keep)


def test_budget_checks_through_options():
    with pytest.raises(ConfigError, match=r"keep must be in \(0, 1\], got 1.5"):
        Budget(1.5)
    with pytest.raises(ConfigError, match="a number"):
        Budget("auto")


def test_tolerance_and_keep_go_together():
    assert options.check_keep_and_tolerance("auto", None, 0.1) == ("auto", 0.1)
    assert options.check_keep_and_tolerance(0.5, None, 0.1) == (0.5, None)
    with pytest.raises(ConfigError, match="applies to --keep auto only"):
        options.check_keep_and_tolerance(0.5, 0.2, 0.1)
    for bad in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ConfigError, match="finite number > 0"):
            options.check_tolerance(bad)


def test_choices_name_the_option_and_the_values():
    assert options.check_choice("format", "zarr", options.FORMATS) == "zarr"
    with pytest.raises(ConfigError, match="allocate must be uniform or pilot, got 'pilto'"):
        options.check_choice("allocate", "pilto", options.ALLOCATIONS)
    with pytest.raises(ConfigError, match="quant must be one of none, int8, int4"):
        options.check_storage("float16", "int2")
    with pytest.raises(ConfigError, match="dtype must be one of"):
        options.check_storage("float64", "none")


def test_option_strings():
    assert options.parse_keeps("auto, 0.5,0.25") == ["auto", 0.5, 0.25]
    with pytest.raises(ConfigError, match="not a number"):
        options.parse_keeps("0.5,most")
    with pytest.raises(ConfigError, match=r"every keep must be in \(0, 1\]"):
        options.parse_keeps("0.5,2")
    assert options.parse_allocations("uniform,pilot") == ["uniform", "pilot"]
    for bad in ("", "uniform,pilto"):
        with pytest.raises(ConfigError, match="give uniform, pilot or both"):
            options.parse_allocations(bad)
    assert options.parse_list("1024, 2048", int) == [1024, 2048]


def test_eval_config_refuses_an_unknown_allocation():
    from kvforge.eval.runner import EvalConfig

    assert EvalConfig(allocations=["pilot"]).allocations == ["pilot"]
    with pytest.raises(ConfigError, match="give uniform, pilot or both"):
        EvalConfig(allocations=["pilto"])


def test_eval_options_are_checked_before_any_model_loads():
    from kvforge.eval.session import eval_config

    good = dict(methods="knorm", keeps="0.5", tolerance=0.1, allocations="uniform", tasks=None, lengths="300",
                samples=1, against="", seed=0, max_new_tokens=4)
    cfg = eval_config(**good)
    assert (cfg.methods, cfg.keeps, cfg.lengths, cfg.allocations) == (["knorm"], [0.5], [300], ["uniform"])
    for bad, match in [({"tasks": "niah_number,nope"}, "unknown task kinds"), ({"against": "other"}, "only kvpress"),
                       ({"methods": "knorm,nope"}, "unknown method"), ({"tolerance": 0.0}, "finite number > 0"),
                       ({"allocations": "pilto"}, "give uniform, pilot or both"), ({"lengths": "3x"}, "--lengths")]:
        with pytest.raises(ConfigError, match=match):
            eval_config(**(good | bad))


def test_check_executor():
    assert options.check_executor("local") == ("local", None, None, None)
    assert options.check_executor("ray", "2", 1, "auto") == ("ray", 2, 1, "auto")
    assert options.check_executor("local", 1, 2, "") == ("local", 1, 2, None)
    with pytest.raises(ConfigError, match="executor must be local or ray, got 'dask'"):
        options.check_executor("dask")
    with pytest.raises(ConfigError, match="--workers 2 needs --executor ray"):
        options.check_executor("local", workers=2)
    with pytest.raises(ConfigError, match="--ray-address applies to --executor ray only"):
        options.check_executor("local", ray_address="auto")
    for bad in (0, -1, "two", 1.5, True):
        with pytest.raises(ConfigError, match="--threads-per-worker must be"):
            options.check_executor("ray", threads_per_worker=bad)
