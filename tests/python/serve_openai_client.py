"""The official `openai` Python client against `overfill serve`: completions and chat
completions, each non-streaming and streaming (greedy), and the model list.

Prints one JSON object with the texts, finish reasons and usage the client parsed.

    python serve_openai_client.py http://127.0.0.1:PORT/v1 PROMPT MAX_TOKENS
"""
import json
import sys

import openai


def main():
    base_url, prompt, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    out = {"model": model, "openai_version": openai.__version__}

    c = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
    out["completion"] = {"text": c.choices[0].text, "finish_reason": c.choices[0].finish_reason,
                         "usage": c.usage.model_dump(), "index": c.choices[0].index}
    text, finish, usage = "", None, None
    for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True}):
        for choice in chunk.choices:
            text += choice.text
            finish = choice.finish_reason or finish
        if chunk.usage:
            usage = chunk.usage.model_dump()
    out["completion_stream"] = {"text": text, "finish_reason": finish, "usage": usage}

    messages = [{"role": "user", "content": prompt}]
    c = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
    out["chat"] = {"text": c.choices[0].message.content, "role": c.choices[0].message.role,
                   "finish_reason": c.choices[0].finish_reason, "usage": c.usage.model_dump()}
    text, finish, usage, roles = "", None, None, []
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                temperature=0, stream=True,
                                                stream_options={"include_usage": True}):
        for choice in chunk.choices:
            if choice.delta.role:
                roles.append(choice.delta.role)
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
        if chunk.usage:
            usage = chunk.usage.model_dump()
    out["chat_stream"] = {"text": text, "finish_reason": finish, "usage": usage, "roles": roles}

    # A list of prompts: one choice per prompt, placed by its index.
    c = client.completions.create(model=model, prompt=[prompt, prompt + " again"], max_tokens=max_tokens,
                                  temperature=0)
    out["batch"] = sorted(({"index": ch.index, "text": ch.text} for ch in c.choices), key=lambda x: x["index"])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
