#!/usr/bin/env python3
"""Writes the committed seed corpora under fuzz/corpus/<target>/ (run from anywhere:
`python3 fuzz/make_seeds.py`). Each seed is a small realistic input in the layout its target
reads (see fuzz/README.md); the JobSpec and result-line seeds reuse tests/data/bad/."""

import json
import struct
from pathlib import Path

FUZZ = Path(__file__).resolve().parent
ROOT = FUZZ.parent
BAD = ROOT / "tests" / "data" / "bad"
RS, US, ABSENT = "\x1e", "\x1f", "\x18"


def write(target, name, data):
    path = FUZZ / "corpus" / target / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


# ---------------------------------------------------------------- render_row
# flags: bits 0-1 provider (0 openai, 1 anthropic, 2 sim), bit 2 explicit context columns,
# bit 3 no temperature, bit 4 max_cell_bytes = byte 1, bits 5-7 temperature * 4.
def row(flags, row_index, columns, cells, targets, context, instructions, model, fields,
        max_cell=0):
    head = bytes([flags, max_cell]) + struct.pack("<q", row_index)
    text = RS.join([US.join(columns), US.join(cells), US.join(targets), US.join(context),
                    instructions, model, *fields])
    return head + text.encode()


README_FIELDS = ["seo_title:string:SEO title", "category:enum(toys|tools|garden):the best shelf",
                 "tags:array:3 to 5 keywords"]
PRODUCTS = ["sku", "name", "brand", "price", "description"]
write("render_row", "products_openai", row(
    0, 0, PRODUCTS,
    ["00000", "Acme screwdriver set", "Acme", "19.99",
     'A durable screwdriver set by Acme. Great for "everyday" use, gifts, and more.\n'
     "Second line: dimensions 20×30 cm, weight 1,5 kg."],
    ["description"], [], "Write an SEO title of at most 60 characters and pick a category",
    "gpt-4o-mini", README_FIELDS))
write("render_row", "products_anthropic_context", row(
    1 | 4, 37, PRODUCTS,
    ["00037", "Acme kite", "Acme", "130.00",
     'A classic kite by Acme. Great for "everyday" use, gifts, and more.'],
    ["description"], ["name", "brand"], "Summarize", "claude-3-5-haiku-latest",
    README_FIELDS + ["in_stock:boolean", "price_eur:number"]))
write("render_row", "crlf_sim_no_temperature", row(
    2 | 8, 2, ["sku", "description"], ["00502", "A kite, blue,\r\nwith a 20 m line."],
    ["description"], [], "Summarize", "", ["title:string:a title"]))
write("render_row", "bom_two_targets_absent_cell", row(
    0 | (2 << 5), 1, ["sku", "name", "description"], ["00501", ABSENT, "A red rubber ball ✓ 🐕"],
    ["name", "description"], [], 'Write a "title".\nThen a tag.', "gpt-4o-mini",
    ["title:string:short", "tag:enum(a|b| c ):pick one"]))
write("render_row", "nul_cell_refused", row(
    0x10, 3, ["sku", "description"], ["00502", "A kite\x00\x00 with a line."],
    ["description"], [], "Summarize", "gpt-4o-mini", ["title:string"], max_cell=64))
write("render_row", "empty_target_skipped", row(
    0, 4, ["sku", "description"], ["00503", ""], ["description"], [], "Summarize",
    "gpt-4o-mini", ["title:string"]))
write("render_row", "ragged_extra_cells_negative_index", row(
    1, -1, ["sku", "name", "description"], ["00502", "kite", "A blue kite.", "EXTRA", "MORE"],
    ["description", "missing"], [], "Summarize", "gpt-4o-mini", ["title:string:t:with:colons"]))

# -------------------------------------------------------------- result_lines
# flags: bit 0 anthropic, bits 1-2 batch end (0 completed, 1 expired, 2 cancelled, 3 failed).
def shard(flags, fields, ids, *files):
    return bytes([flags]) + RS.encode().join(
        [US.join(fields).encode(), " ".join(ids).encode(), *[f.encode() if isinstance(f, str)
                                                             else f for f in files]])


def jl(*objects):
    return "\n".join(json.dumps(o, ensure_ascii=False) for o in objects) + "\n"


write("result_lines", "results_bad_lines", shard(
    0, ["title:string"], ["r0", "r1", "r2"], (BAD / "results_bad_lines.jsonl").read_bytes()))

FIELDS5 = ["title:string", "category:enum(toys|tools)", "in_stock:boolean", "tags:array",
           "price:number"]
GOOD5 = {"price": 12.5, "tags": ["a", "b"], "in_stock": True, "category": "toys", "title": "Ball"}


def openai(custom_id, content, finish="stop", refusal=None):
    return {"id": "batch_req_1", "custom_id": custom_id, "response": {
        "status_code": 200, "request_id": "x", "body": {"choices": [{
            "index": 0, "finish_reason": finish,
            "message": {"role": "assistant", "content": content, "refusal": refusal}}]}},
        "error": None}


write("result_lines", "openai_every_outcome", shard(0, FIELDS5, ["r41", "r1", "r2", "r3", "r4", "r5", "r6"], jl(
    openai("r41", json.dumps(GOOD5)),
    openai("r1", "{not json"),
    openai("r2", json.dumps({"title": "t"})),
    openai("r3", json.dumps({**GOOD5, "category": "food"})),
    openai("r4", json.dumps(GOOD5)[:30], finish="length"),
    openai("r5", None, refusal="I can't help with that."),
    {"custom_id": "r6", "response": {"status_code": 500, "body": {
        "error": {"message": "server error", "type": "server_error"}}}, "error": None},
)))
write("result_lines", "openai_sim_output_and_errors_cancelled", shard(
    2 << 1, ["seo_title:string:SEO title", "category:enum(toys|tools|garden):best shelf"],
    ["r0", "r37", "r74"],
    jl({"id": "batch_req_0_batch_1", "custom_id": "r0", "response": {
        "status_code": 200, "request_id": "req_0", "body": {
            "id": "chatcmpl-0", "object": "chat.completion", "created": 1764230400,
            "model": "gpt-4o-mini", "choices": [{"index": 0, "message": {
                "role": "assistant", "content": json.dumps(
                    {"seo_title": "Acme screwdriver set", "category": "tools"}),
                "refusal": None}, "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 50, "completion_tokens": 5, "total_tokens": 55}}},
        "error": None}),
    jl({"id": "batch_req_1_batch_1", "custom_id": "r37", "response": {
        "status_code": 400, "request_id": "req_1", "body": {"error": {
            "message": "Invalid request: the messages could not be processed.",
            "type": "invalid_request_error", "param": None, "code": None}}}, "error": None},
       {"id": "batch_req_2_batch_1", "custom_id": "r74", "response": None, "error": {
           "code": "batch_cancelled",
           "message": "This request was not executed because the batch was cancelled."}})))
write("result_lines", "openai_expired_odd_shapes", shard(
    1 << 1, ["title:string"], ["r1", "r2", "r3", "r4"],
    jl({"custom_id": "r1", "response": None, "error": {
        "code": "batch_expired",
        "message": "This request could not be executed before the completion window expired."}},
       {"custom_id": "r2", "response": None, "error": "a string error"},
       {"custom_id": "r3", "response": {"status_code": 200, "body": "not an object"}},
       {"custom_id": "x9", "response": None, "error": None})))
write("result_lines", "failed_batch_no_lines", shard(3 << 1, ["title:string"], ["r0", "r1"]))


def anthropic(custom_id, result):
    return {"custom_id": custom_id, "result": result}


def message(content, stop_reason):
    return {"type": "succeeded", "message": {
        "id": "msg_0_msgbatch_1", "type": "message", "role": "assistant",
        "model": "claude-3-5-haiku-latest", "content": content, "stop_reason": stop_reason,
        "stop_sequence": None, "usage": {"input_tokens": 60, "output_tokens": 20}}}


def errored(kind):
    return {"type": "errored", "error": {"type": "error", "error": {"type": kind, "message": "m"},
                                         "request_id": None}}


write("result_lines", "anthropic_every_type", shard(1, FIELDS5, ["r7", "r1", "r2", "r3", "r4", "r5", "r6", "r8"], jl(
    anthropic("r7", message([{"type": "tool_use", "id": "toolu_0", "name": "row_enrichment",
                              "input": {"title": "T", "category": "tools", "in_stock": False,
                                        "tags": ["x"], "price": 3}}], "tool_use")),
    anthropic("r1", errored("invalid_request_error")),
    anthropic("r2", {"type": "expired"}),
    anthropic("r3", {"type": "canceled"}),
    anthropic("r4", message([{"type": "text", "text": "I can't help with that."}], "refusal")),
    anthropic("r5", message([{"type": "text", "text": "{broken"}], "end_turn")),
    anthropic("r6", errored("overloaded_error")),
    anthropic("r8", message([{"type": "text", "text": "{\"partial\": "}], "max_tokens")),
)))

# ------------------------------------------------------------------- jobspec
for name in ["jobspec_malformed.json", "jobspec_unknown_field.json"]:
    write("jobspec", name.removesuffix(".json"), (BAD / name).read_bytes())
write("jobspec", "sdk_minimal", json.dumps({
    "job_id": "sdk-1", "input": "inputs/sdk-1/products.csv",
    "instructions": "Write an SEO title of at most 60 characters and pick a category.",
    "target_columns": ["description"],
    "fields": [{"name": "seo_title", "type": "string", "description": "SEO title"},
               {"name": "category", "type": "enum", "values": ["toys", "tools", "garden"],
                "description": "the best shelf"}],
    "provider": "sim"}, indent=2))
write("jobspec", "full_with_fallback", json.dumps({
    "job_id": "job_01HZX-full", "input": "file:///data/inputs/products.csv",
    "instructions": "Write an SEO title of at most 60 characters, pick a category, tags, price, stock.",
    "target_columns": ["description", "name"], "context_columns": ["sku", "brand"],
    "fields": [{"name": "seo_title", "type": "string", "description": "SEO title"},
               {"name": "category", "type": "enum", "values": ["toys", "tools", "garden"]},
               {"name": "in_stock", "type": "boolean"},
               {"name": "tags", "type": "array", "description": "3 to 5 keywords"},
               {"name": "price_eur", "type": "number"}],
    "provider": "openai", "model": "gpt-4o-mini",
    "options": {"max_attempts": 3, "max_requests_per_batch": 50000,
                "max_batch_bytes": 200000000, "temperature": 0.2,
                "output_formats": ["csv", "parquet", "jsonl"], "budget_usd": 12.5},
    "fallback": {"provider": "anthropic", "model": "claude-3-5-haiku-latest"}}))
write("jobspec", "anthropic_no_context", json.dumps({
    "job_id": "a", "input": "inputs/a/x.csv", "instructions": "Classify\n\"carefully\" ✓",
    "target_columns": ["text"], "context_columns": [],
    "fields": [{"name": "_label", "type": "enum", "values": ["", "pos", "neg"]}],
    "provider": "anthropic", "model": "claude-3-5-haiku-latest",
    "options": {"temperature": None, "max_attempts": 1}}))
write("jobspec", "invalid_job_id", json.dumps({
    "job_id": "../etc", "input": "inputs/a.csv", "instructions": "do it",
    "target_columns": ["description"], "fields": [{"name": "title", "type": "string"}]}))
write("jobspec", "field_collides_with_column", json.dumps({
    "job_id": "collide", "input": "inputs/a.csv", "instructions": "do it",
    "target_columns": ["title"], "fields": [{"name": "title", "type": "number"}],
    "options": {"max_batch_bytes": 10000, "max_requests_per_batch": 1}}))
