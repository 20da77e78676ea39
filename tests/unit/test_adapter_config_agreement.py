"""adapter_config.json must agree with the weights, as PEFT reads it: ``r`` / ``rank_pattern`` vs the
weights' ranks, ``target_modules`` (list or regex string) covering every module the weights hold,
and fields of the right type. Refusals name both values; the gRPC edge maps them to INVALID_ARGUMENT."""

from __future__ import annotations

import json

import grpc
import pytest

from loraplex_server.api.errors import status_for
from loraplex_server.errors import AdapterLoadError
from loraplex_server.lora.loader import inspect_adapter, load_adapter

from test_adapter_loader import save, targets, tiny_model  # noqa: F401 - fixtures and builders

from peft import PeftModel


def rewrite(path, **fields):
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(fields)
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def refused(path, targets, match):
    with pytest.raises(AdapterLoadError, match=match) as info:
        inspect_adapter("x", path, targets, 64)
    assert status_for(info.value) is grpc.StatusCode.INVALID_ARGUMENT
    return str(info.value)


def test_r_disagreeing_with_the_weights_names_both(tmp_path, targets):
    message = refused(rewrite(save(tmp_path, r=4), r=8), targets, r"r=8")
    assert "rank 4" in message and "q_proj" in message


def test_rank_pattern_entry_disagreeing_with_the_weights_names_the_pattern(tmp_path, targets):
    path = save(tmp_path, r=4, rank_pattern={"v_proj": 2})
    inspect_adapter("ok", path, targets, 64)  # PEFT's own output agrees
    message = refused(rewrite(path, rank_pattern={"v_proj": 6}), targets, r"rank_pattern")
    assert "'v_proj': 6" in message and "rank 2" in message


def test_target_modules_list_must_cover_the_weights(tmp_path, targets):
    message = refused(rewrite(save(tmp_path, r=4, target_modules=["q_proj", "v_proj"]), target_modules=["q_proj"]),
                      targets, r"target_modules")
    assert "['q_proj']" in message and "v_proj" in message


def test_target_modules_regex_is_a_fullmatch_of_the_module_name(tmp_path, targets):
    regex = r".*\.layers\.0\.self_attn\.(q_proj|v_proj)"
    path = save(tmp_path, r=4, target_modules=regex)  # PEFT: only layer 0
    assert {k.layer for k in load_adapter("ok", path, targets, 64).modules} == {0}
    both = save(tmp_path, "both", r=4, target_modules=["q_proj", "v_proj"])  # layers 0 and 1
    message = refused(rewrite(both, target_modules=regex), targets, r"target_modules")
    assert repr(regex) in message and "layers.1" in message


def test_all_linear_covers_every_linear_module(tmp_path, targets):
    inspect_adapter("ok", rewrite(save(tmp_path, r=4), target_modules="all-linear"), targets, 64)


@pytest.mark.parametrize("fields, match", [
    ({"r": "abc"}, r"r must be a positive integer, got 'abc'"),
    ({"r": 0}, r"r must be a positive integer, got 0"),
    ({"r": True}, r"r must be a positive integer, got True"),
    ({"target_modules": 5}, r"target_modules must be a list of module names or a regex string, got 5"),
    ({"target_modules": ["q_proj", 3]}, r"target_modules must be a list of module names"),
    ({"lora_alpha": None}, r"lora_alpha must be a finite number, got None"),
    ({"lora_alpha": "16"}, r"lora_alpha must be a finite number, got '16'"),
    ({"rank_pattern": ["v_proj"]}, r"rank_pattern must be an object"),
    ({"rank_pattern": {"v_proj": "2"}}, r"rank_pattern\['v_proj'\] must be a positive integer"),
    ({"alpha_pattern": {"v_proj": None}}, r"alpha_pattern\['v_proj'\] must be a finite number"),
    ({"use_rslora": "yes"}, r"use_rslora must be true or false, got 'yes'"),
])
def test_wrongly_typed_fields_are_refused_with_a_clear_message(tmp_path, targets, fields, match):
    refused(rewrite(save(tmp_path, r=4), **fields), targets, match)


def test_peft_itself_refuses_what_we_refuse(tmp_path):
    """The oracle: PEFT cannot load an adapter whose r disagrees with its weights."""
    path = rewrite(save(tmp_path, r=4), r=8)
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(tiny_model(), str(path))


@pytest.mark.parametrize("fields", [{"target_modules": "q_proj("}, {"rank_pattern": {"[v_proj": 4}},
                                    {"alpha_pattern": {"*q": 4}}])
def test_invalid_regular_expressions_are_refused_not_crashed_on(tmp_path, targets, fields):
    refused(rewrite(save(tmp_path, r=4), **fields), targets, "not a valid regular expression")
