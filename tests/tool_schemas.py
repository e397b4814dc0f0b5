"""What the tool-calling tests (and tests.perf.tool_masks) share: function parameter
schemas, and chat templates that render tools in each call format."""

from __future__ import annotations

import shutil
from pathlib import Path

from app.tokenizer import Tokenizer

# get_weather's parameters: a bounded string and an enum, both required.
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}


# A template in the Llama 3 manner: tools listed in the first user turn, calls as JSON
# objects with "parameters", results in an `ipython` turn (ChatML markers, as the
# default vocabulary has them).
LLAMA_TEMPLATE = (
    "{% for m in messages %}<|im_start|>"
    "{{ 'ipython' if m.role == 'tool' else m.role }}\n"
    "{% if loop.first and tools %}Answer with a call as "
    '{"name": function name, "parameters": arguments}. Functions:\n'
    "{% for t in tools %}{{ t | tojson }}\n{% endfor %}{% endif %}"
    "{{ m.content or '' }}{% for c in m.tool_calls or [] %}"
    '{"name": "{{ c.function.name }}", "parameters": {{ c.function.arguments | tojson }}}'
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
UNKNOWN_FORMAT_TEMPLATE = (
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    "{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
)


def tokenizer_with_template(default_model_path: Path, folder: Path, template: str, **options):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_path / name, folder / name)
    (folder / "chat_template.jinja").write_text(template)
    return Tokenizer(folder, **options)
