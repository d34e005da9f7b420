# Renders chat templates exactly the way Hugging Face transformers' apply_chat_template
# (tokenize=False) does (transformers/utils/chat_template_utils.py: _compile_jinja_template,
# render_jinja_template): jinja2 ImmutableSandboxedEnvironment(trim_blocks=True,
# lstrip_blocks=True, extensions=[loopcontrols]), a json.dumps-based `tojson` filter, the
# `raise_exception` and `strftime_now` globals, special tokens as variables, tools/documents
# passed (None when absent), continue_final_message cut after the last message's content.
# Run: python3 hf_parity.py > hf_parity.json   (jinja2 3.1.6, Python 3.11)
import json, sys
from datetime import datetime
import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

def compile_template(src):
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)
    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    def strftime_now(format):
        return datetime.now().strftime(format)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(src)

def apply_chat_template(src, special, messages, add_generation_prompt=False, tools=None,
                        continue_final_message=False):
    rendered = compile_template(src).render(messages=messages, tools=tools, documents=None,
                                            add_generation_prompt=add_generation_prompt, **special)
    if continue_final_message:
        final = messages[-1]["content"]
        rendered = rendered[: rendered.rindex(final.strip()) + len(final.strip())]
    return rendered

here = sys.path[0] + "/../../templates/"
chatml = open(here + "chatml.jinja").read()
llama = open(here + "llama-3.1.jinja").read()
llama_special = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}

convo = [
    {"role": "system", "content": "You are a concise assistant. "},
    {"role": "user", "content": "  What is a VAE?\n"},
    {"role": "assistant", "content": "A variational autoencoder: an encoder, a latent space, a decoder."},
    {"role": "user", "content": "Say it for a manager — café, naïve, 你好, \"quotes\", back\\slash, <tags> & {braces}."},
]
no_system = [{"role": "user", "content": "Hello!"}]
weather_tool = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current temperature at a place (°C).",
        "parameters": {
            "type": "object",
            "properties": {
                "place": {"type": "string", "description": "City, \"Country\""},
                "units": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "default": 1.5},
            },
            "required": ["place"],
        },
    },
}
tool_convo = [
    {"role": "system", "content": "You can call tools."},
    {"role": "user", "content": "Weather in Zürich?"},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"place": "Zürich", "days": 2}}}]},
    {"role": "tool", "content": "{\"temperature\": 21.5}"},
]
prefill = [
    {"role": "user", "content": "Name three colours."},
    {"role": "assistant", "content": "Red, green and"},
]

cases = []
def case(name, template, special, messages, **kw):
    src = chatml if template == "chatml" else llama
    cases.append({"name": name, "template": template, "messages": messages,
                  "add_generation_prompt": kw.get("add_generation_prompt", False),
                  "continue_final_message": kw.get("continue_final_message", False),
                  "tools": kw.get("tools"),
                  "expected": apply_chat_template(src, special, messages, **kw)})

case("chatml_convo_gen", "chatml", {}, convo, add_generation_prompt=True)
case("chatml_convo_nogen", "chatml", {}, convo)
case("chatml_prefill", "chatml", {}, prefill, continue_final_message=True)
case("llama31_convo_gen", "llama-3.1", llama_special, convo, add_generation_prompt=True)
case("llama31_convo_nogen", "llama-3.1", llama_special, convo)
case("llama31_no_system", "llama-3.1", llama_special, no_system, add_generation_prompt=True)
case("llama31_prefill", "llama-3.1", llama_special, prefill, continue_final_message=True)
case("llama31_tools", "llama-3.1", llama_special, tool_convo, add_generation_prompt=True, tools=[weather_tool])
# The messages kiln-prompt lays out for tests/golden/release_notes.toml (its own golden file).
spec_msgs = json.load(open(sys.path[0] + "/release_notes.messages.json"))
case("spec_chatml_gen", "chatml", {}, spec_msgs, add_generation_prompt=True)
case("spec_llama31_gen", "llama-3.1", llama_special, spec_msgs, add_generation_prompt=True)
json.dump(cases, sys.stdout, ensure_ascii=False, indent=1)
print()
