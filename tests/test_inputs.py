"""check_inputs: every check a request needs beyond Cog's schema, in one place, as pure functions.
And the line between a user's mistake (UserError, shown as is) and our own fault (anything else,
a ValueError from a library included: one line that points to the logs)."""

from __future__ import annotations

import logging

import pytest
from cog import Secret

import predict
from errors import UserError
from pipelines import ModelTraits

DEV = ModelTraits(guidance=True, max_sequence_length=512, max_steps=None)
SCHNELL = ModelTraits(guidance=False, max_sequence_length=256, max_steps=4)


def check(**overrides) -> predict.Request:
    inputs = dict(
        prompt="a cat",
        image=None,
        mask=None,
        aspect_ratio="1:1",
        width=None,
        height=None,
        num_outputs=1,
        num_inference_steps=28,
        traits=DEV,
        prompt_strength=0.8,
        seed=1,
        extra_lora=None,
        extra_lora_scale=1.0,
        replicate_weights=None,
        hf_api_token=None,
        civitai_api_token=None,
    )
    return predict.check_inputs(**{**inputs, **overrides})


def test_txt2img_request():
    request = check(num_outputs=3, seed=10)
    assert (request.mode, request.size, request.steps, request.seeds) == ("txt2img", (1024, 1024), 28, [10, 11, 12])


def test_schnell_caps_the_steps():
    assert check(traits=SCHNELL, num_inference_steps=28).steps == 4
    assert check(traits=SCHNELL, num_inference_steps=2).steps == 2


def test_a_random_seed_is_picked_and_logged(caplog):
    caplog.set_level(logging.INFO, logger="predict")
    request = check(seed=None)
    assert 0 <= request.seeds[0] < 2**32 and f"random seed {request.seeds[0]}" in caplog.text


@pytest.mark.parametrize("num_outputs", [1, 2, 4])
def test_the_seed_bound_follows_num_outputs(num_outputs):
    top = 2**63 - num_outputs
    assert check(seed=top, num_outputs=num_outputs).seeds[-1] == 2**63 - 1
    with pytest.raises(UserError, match=f"from 0 to {top}\\.$"):
        check(seed=top + 1, num_outputs=num_outputs)
    with pytest.raises(UserError, match=f"num_outputs={num_outputs}"):
        check(seed=-1, num_outputs=num_outputs)


def test_a_prompt_is_bounded_before_any_tokenizing():
    assert check(prompt="x" * predict.MAX_PROMPT_CHARS).mode == "txt2img"
    with pytest.raises(UserError, match=r"prompt is 2,000,000 characters, over the 10,000 accepted"):
        check(prompt="x" * 2_000_000)
    with pytest.raises(UserError, match="prompt is empty"):
        check(prompt=" \t\n\u3000")


def test_a_lora_source_is_bounded():
    with pytest.raises(UserError, match="extra_lora is 100,000 characters"):
        check(extra_lora="a" * 100_000)
    with pytest.raises(UserError, match="replicate_weights is 100,000 characters"):
        check(replicate_weights="a" * 100_000)


def test_an_extra_lora_list_is_checked_before_any_download():
    with pytest.raises(UserError, match="a/b:3"):
        check(extra_lora="x/y:0.5, a/b:3")


def test_user_tokens_are_checked_and_carried_but_never_shown():
    request = check(hf_api_token=Secret("hf_abc123"), civitai_api_token=Secret("  civ456 "))
    assert request.tokens.huggingface == "hf_abc123" and request.tokens.civitai == "civ456"
    assert "abc123" not in repr(request) and "civ456" not in repr(request)
    for bad in ("a b", "x" * 2000, "to\nk", "\x00"):
        with pytest.raises(UserError, match="hf_api_token does not look like an API token") as error:
            check(hf_api_token=Secret(bad))
        assert bad.strip() not in str(error.value) or not bad.strip()
    assert check(hf_api_token=Secret("")).tokens.huggingface == ""


def test_mask_needs_an_image():
    with pytest.raises(UserError, match="mask was given without image"):
        check(mask="mask.png")


def test_a_user_error_is_its_own_line(caplog):
    with pytest.raises(UserError, match="^prompt is empty"), predict.user_errors():
        raise UserError("prompt is empty: describe the image you want.")
    assert "Traceback" not in caplog.text


def test_a_library_value_error_is_internal_with_its_traceback_in_the_logs(caplog):
    caplog.set_level(logging.INFO, logger="predict")
    with pytest.raises(RuntimeError, match=r"^internal error \(ValueError: boom\); the traceback is in the logs\.$"):
        with predict.user_errors():
            raise ValueError("boom")  # what diffusers, torch or PIL raise for their own reasons
    assert any(record.exc_info for record in caplog.records)


def test_half_of_a_utf16_pair_in_the_prompt_is_the_users_one_line():
    with pytest.raises(UserError, match=r"half of a UTF-16 pair \(\\ud83d at character 7\)"):
        check(prompt="a cat \ud83d")


def test_names_from_outside_are_logged_on_one_line():
    """Archive members, hub listings and CivitAI's file names reach logs and errors escaped: a newline in
    one cannot forge a log line, nor a right-to-left override reverse one."""
    from loras.files import pick_lora_file
    from untrusted import printable

    assert printable("a\nINFO forged\u202etxt.exe\\x") == "a\\nINFO forged\\u202etxt.exe\\\\x"
    assert printable("é 猫 🐱") == "é 猫 🐱" and printable("x" * 300) == "x" * 200 + "…"
    for names in (["README\nINFO setup done"], ["a.safetensors", "b\r\n.safetensors"]):
        with pytest.raises(UserError) as error:
            pick_lora_file(names, "LoRA x: the archive")
        assert "\n" not in str(error.value) and "\r" not in str(error.value)
