"""Load test of `overfill serve` on loopback: N concurrent requests, mixed streaming and not,
completions and chat, through the standard library's http.client (one thread per request).

Each request i asks for max_tokens = BASE + i % SPREAD (1 + i % 6 by default) with ignore_eos, so its answer's token count
says which request it belongs to. Prints one JSON object: per-status counts, how many answers
are complete and well-formed, the response ids (to find duplicates), and every problem found.

    python serve_load.py http://127.0.0.1:PORT --requests 200 [--max-tokens-base 1] [--max-tokens-spread 6]
"""
import argparse
import http.client
import json
import sys
import threading
import time
import urllib.parse


def post(base, path, body, timeout=120):
    """Returns (status, headers, raw response bytes)."""
    url = urllib.parse.urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def get(base, path, timeout=30):
    url = urllib.parse.urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def read_sse(raw):
    """The `data:` payloads of a server-sent-event body, in order."""
    events = []
    for block in raw.decode("utf-8").split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data:"):
                events.append(line[len("data:"):].strip())
    return events


def one_request(base, i, stream, chat, max_tokens, prompt=None, ignore_eos=True, timeout=120):
    """Sends one request; returns a dict: status, id, text, completion_tokens, finish_reason,
    latency (s), problems (list of strings)."""
    prompt = prompt if prompt is not None else f"request {i}: say something"
    body = {"model": "m", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": ignore_eos, "seed": i}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = prompt
        path = "/v1/completions"
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    start = time.perf_counter()
    status, headers, raw = post(base, path, body, timeout=timeout)
    result = {"i": i, "status": status, "stream": stream, "chat": chat, "problems": []}
    if status != 200:
        try:
            result["error"] = json.loads(raw)
        except ValueError:
            result["problems"].append(f"non-JSON error body {raw[:200]!r}")
        result["latency"] = time.perf_counter() - start
        return result
    if not stream:
        answer = json.loads(raw)
        choice = answer["choices"][0]
        result["id"] = answer["id"]
        result["text"] = choice["message"]["content"] if chat else choice["text"]
        result["finish_reason"] = choice["finish_reason"]
        result["completion_tokens"] = answer["usage"]["completion_tokens"]
    else:
        if "text/event-stream" not in headers.get("content-type", ""):
            result["problems"].append(f"stream content-type {headers.get('content-type')}")
        events = read_sse(raw)
        if not events or events[-1] != "[DONE]":
            result["problems"].append("stream does not end with [DONE]")
        chunks = [json.loads(e) for e in events if e != "[DONE]"]
        ids = {c["id"] for c in chunks}
        if len(ids) != 1:
            result["problems"].append(f"chunk ids {ids}")
        result["id"] = chunks[0]["id"] if chunks else None
        text, finishes, usage = "", [], None
        for c in chunks:
            if "error" in c:
                result["problems"].append(f"error chunk {c}")
            for choice in c.get("choices", []):
                piece = choice.get("delta", {}).get("content") if chat else choice.get("text")
                text += piece or ""
                if choice.get("finish_reason"):
                    finishes.append(choice["finish_reason"])
            if c.get("usage"):
                usage = c["usage"]
        if len(finishes) != 1:
            result["problems"].append(f"{len(finishes)} finish reasons")
        result["text"] = text
        result["finish_reason"] = finishes[0] if finishes else None
        result["completion_tokens"] = usage["completion_tokens"] if usage else None
    result["latency"] = time.perf_counter() - start
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("base")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--max-tokens-base", type=int, default=1)
    parser.add_argument("--max-tokens-spread", type=int, default=6)
    args = parser.parse_args()

    results = [None] * args.requests
    barrier = threading.Barrier(args.requests)

    def worker(i):
        barrier.wait()  # all requests go out together
        try:
            results[i] = one_request(
                args.base, i, stream=i % 2 == 0, chat=i % 3 == 0,
                max_tokens=args.max_tokens_base + i % args.max_tokens_spread,
            )
        except Exception as e:  # a lost request is a finding, not a crash of the test
            results[i] = {"i": i, "status": None, "problems": [f"{type(e).__name__}: {e}"]}

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    statuses, problems, ids, complete = {}, [], [], 0
    for r in results:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
        problems += [f"request {r['i']}: {p}" for p in r["problems"]]
        if r["status"] == 200:
            ids.append(r["id"])
            want = args.max_tokens_base + r["i"] % args.max_tokens_spread
            if r["completion_tokens"] != want:
                problems.append(f"request {r['i']}: {r['completion_tokens']} tokens, asked for {want}")
            elif r["finish_reason"] != "length":
                problems.append(f"request {r['i']}: finish_reason {r['finish_reason']}")
            else:
                complete += 1
        elif r["status"] == 429:
            err = r.get("error", {}).get("error", {})
            if err.get("code") != "queue_full" or not err.get("message"):
                problems.append(f"request {r['i']}: 429 body {r.get('error')}")
    health, _ = get(args.base, "/health")
    print(json.dumps({
        "statuses": statuses,
        "complete": complete,
        "ids": ids,
        "unique_ids": len(set(ids)),
        "problems": problems,
        "health_after": health,
    }))


if __name__ == "__main__":
    sys.exit(main())
