"""The official `openai` Python client against `overfill serve --api-key`: a greedy completion
with the right key, and the error the client raises with a wrong one.

Prints one JSON object:
{"text": ..., "models": [...], "wrong_key": {"error": ..., "status": ..., "body": ...}}

    python serve_api_key.py http://127.0.0.1:PORT/v1 KEY PROMPT MAX_TOKENS
"""
import json
import sys

import openai


def main():
    base_url, key, prompt, max_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120)
    out = {"models": [m.id for m in client.models.list().data]}
    c = client.completions.create(model=out["models"][0], prompt=prompt, max_tokens=max_tokens, temperature=0)
    out["text"] = c.choices[0].text

    wrong = openai.OpenAI(base_url=base_url, api_key=key + "x", max_retries=0, timeout=120)
    try:
        wrong.completions.create(model=out["models"][0], prompt=prompt, max_tokens=max_tokens)
        out["wrong_key"] = None
    except openai.APIStatusError as e:
        out["wrong_key"] = {"error": type(e).__name__, "status": e.status_code, "body": e.body}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
