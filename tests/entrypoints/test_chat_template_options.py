"""Chat-template options: `apply_chat_template` with tools, a template override, template variables,
add_generation_prompt / continue_final_message, and its errors (a ValueError naming the problem);
the server flags --chat-template (file or inline), --trust-request-chat-template,
--enable-auto-tool-choice, --tool-call-parser and --reasoning-parser, and their checks."""
from __future__ import annotations

import argparse

import pytest
import transformers

from pagoda.engine.entrypoints import cli_args
from pagoda.engine.entrypoints.openai.chat_messages import ChatCompletionRequest
from pagoda.engine.entrypoints.settings import ServerSettings
from pagoda.engine.processing.tokenizer import RESERVED_TEMPLATE_KWARGS, apply_chat_template

MESSAGES = [{"role": "user", "content": "Hi"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
# Shows what the renderer was given: the tools' names, a variable, the generation prompt.
PROBE = ("{% for m in messages %}[{{ m['role'] }}:{{ m['content'] }}]{% endfor %}"
         "{% if tools %}tools={% for t in tools %}{{ t['function']['name'] }};{% endfor %}{% endif %}"
         "{% if reasoning_effort is defined %}effort={{ reasoning_effort }}{% endif %}"
         "{% if enable_thinking is defined and not enable_thinking %}no-think{% endif %}"
         "{% if add_generation_prompt %}<gen>{% endif %}")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return transformers.AutoTokenizer.from_pretrained(str(tiny_model_dir), local_files_only=True)


def render(tokenizer, messages=MESSAGES, **kwargs) -> str:
    return tokenizer.decode(apply_chat_template(tokenizer, messages, **kwargs))


def test_tools_template_and_variables_reach_the_renderer(tokenizer):
    assert render(tokenizer, chat_template=PROBE) == "[user:Hi]<gen>"
    assert render(tokenizer, chat_template=PROBE, tools=TOOLS,
                  template_kwargs={"reasoning_effort": "low", "enable_thinking": False}) == \
        "[user:Hi]tools=get_weather;effort=lowno-think<gen>"
    assert render(tokenizer, chat_template=PROBE, add_generation_prompt=False) == "[user:Hi]"


def test_the_request_helpers_feed_apply_chat_template(tokenizer):
    request = ChatCompletionRequest.model_validate({
        "messages": [{"role": "developer", "content": "Terse"}, *MESSAGES], "tools": TOOLS,
        "reasoning_effort": "medium", "chat_template_kwargs": {"enable_thinking": False}})
    text = render(tokenizer, request.template_messages(), chat_template=PROBE, tools=request.template_tools(),
                  template_kwargs=request.template_kwargs())
    assert text == "[system:Terse][user:Hi]tools=get_weather;effort=mediumno-think<gen>"


def test_callers_without_the_new_arguments_render_as_before(tokenizer):
    expected = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert tokenizer.decode(apply_chat_template(tokenizer, MESSAGES, 8192)) == expected
    assert expected.endswith("<|im_start|>assistant\n")


def test_continue_final_message_leaves_the_last_message_open(tokenizer):
    messages = [*MESSAGES, {"role": "assistant", "content": "Once upon"}]
    text = render(tokenizer, messages, add_generation_prompt=False, continue_final_message=True)
    assert text.endswith("<|im_start|>assistant\nOnce upon")
    with pytest.raises(ValueError, match="continue_final_message"):
        apply_chat_template(tokenizer, messages, continue_final_message=True)


@pytest.mark.parametrize("kwargs, words", [
    ({"chat_template": "{% for m in messages %}{{ m.content }"}, ["chat_template", "TemplateSyntaxError"]),
    ({"chat_template": "{{ raise_exception('no users here') }}"}, ["chat_template", "no users here"]),
    ({"chat_template": "{{ messages[0].content.upper(1, 2, 3) }}"}, ["chat_template"]),
    ({"template_kwargs": {"tokenize": True}}, ["tokenize"]),
    ({"template_kwargs": {"messages": []}}, ["messages"]),
    ({"chat_template": "{{ x.y.z }}", "template_kwargs": {"x": 1}}, ["chat_template"]),
])
def test_template_errors_are_value_errors_naming_the_problem(tokenizer, kwargs, words):
    with pytest.raises(ValueError) as raised:
        apply_chat_template(tokenizer, MESSAGES, **kwargs)
    for word in words:
        assert word in str(raised.value), str(raised.value)


def test_a_failing_model_template_with_variables_names_them(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", "{{ raise_exception('bad ' ~ mode) }}")
    with pytest.raises(ValueError, match=r"\['mode'\] \(chat_template_kwargs\).*bad x"):
        apply_chat_template(tokenizer, MESSAGES, template_kwargs={"mode": "x"})


def test_the_reserved_names_are_the_renderers_arguments():
    assert {"tokenize", "tools", "chat_template", "add_generation_prompt", "continue_final_message",
            "messages", "conversation", "return_dict"} <= RESERVED_TEMPLATE_KWARGS
    assert not {"enable_thinking", "reasoning_effort", "kwargs", "self"} & RESERVED_TEMPLATE_KWARGS


# -- server flags -----------------------------------------------------------------------------------------
def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    for name, default in (("--host", "127.0.0.1"), ("--port", 8000), ("--api-key", None), ("--grpc-port", None),
                          ("--allowed-origins", []), ("--max-request-body-bytes", 1 << 20),
                          ("--shutdown-timeout", 1.0), ("--uvicorn-log-level", "info")):
        parser.add_argument(name, default=default)
    cli_args.add_chat_flags(parser)
    return parser.parse_args(list(argv))


def test_chat_flags_parse_into_settings(tmp_path):
    template_file = tmp_path / "tool_chat.jinja"
    template_file.write_text(PROBE)
    settings = cli_args.server_settings_from(parse(
        "--chat-template", str(template_file), "--trust-request-chat-template", "--enable-auto-tool-choice",
        "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3"))
    assert settings.chat_template == PROBE
    assert settings.trust_request_chat_template and settings.enable_auto_tool_choice
    assert (settings.tool_call_parser, settings.reasoning_parser) == ("hermes", "qwen3")
    inline = cli_args.server_settings_from(parse("--chat-template", "{{ messages[0]['content'] }}",
                                                 "--enable-auto-tool-choice"))
    assert inline.chat_template == "{{ messages[0]['content'] }}"
    # auto tool choice without a parser is allowed: the parser can come from the chat template
    assert inline.enable_auto_tool_choice and inline.tool_call_parser is None
    default = cli_args.server_settings_from(parse())
    assert default.chat_template is None and not default.trust_request_chat_template
    assert not default.enable_auto_tool_choice and default.tool_call_parser is default.reasoning_parser is None
    # a namespace from a parser without the chat flags serves the defaults
    bare = argparse.Namespace(**{k: v for k, v in vars(parse()).items() if "chat" not in k and "parser" not in k})
    assert cli_args.server_settings_from(bare).chat_template is None


def test_chat_template_flag_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse("--chat-template", str(tmp_path / "missing.jinja"))
    assert "looks like a file path" in capsys.readouterr().err
    assert cli_args.read_chat_template("x" * 5000 + "{{ 1 }}").endswith("{{ 1 }}")      # too long for a path


@pytest.mark.parametrize("kwargs, words", [
    ({"tool_call_parser": "nope"}, ["tool_call_parser", "hermes"]),
    ({"reasoning_parser": "nope"}, ["reasoning_parser", "qwen3"]),
    ({"chat_template": "{% for m in messages %}"}, ["chat_template", "Jinja"]),
    ({"chat_template": "  "}, ["chat_template", "empty"]),
])
def test_settings_refuse_unknown_parsers_and_broken_templates(kwargs, words):
    with pytest.raises(ValueError) as raised:
        ServerSettings(**kwargs)
    for word in words:
        assert word in str(raised.value), str(raised.value)
