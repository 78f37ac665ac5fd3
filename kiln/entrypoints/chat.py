"""Interactive chat in the terminal: tokens are printed as they are generated."""

from __future__ import annotations

import sys

from kiln.sampling_params import SamplingParams


def run_chat(llm, params: SamplingParams, system: str | None = None) -> None:
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    print("kiln chat — type /exit to quit, /reset to start over.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            messages = messages[:1] if system else []
            continue
        messages.append({"role": "user", "content": text})
        prompt_text = llm.apply_chat_template(messages)
        prompt = {"prompt": prompt_text, "prompt_token_ids": llm.tokenizer.encode(prompt_text, add_special_tokens=False)}
        reply = ""
        for out in llm.generate_stream(prompt, params):
            delta = out.outputs[0].delta_text
            reply += delta
            print(delta, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": reply})
